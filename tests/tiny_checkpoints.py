"""Tiny checkpoints in the layouts published repositories use, built in the test (no ../shared).

A 40-piece SentencePiece model trained on a few sentences and a 16-wide random PEGASUS or PEGASUS-X
stand in for the real thing: loading is about file layouts, names, dtypes and shapes, not sizes.
`reference_state` is the state dict as transformers saves it (tied copies of the embedding and, for
PEGASUS, the sinusoid position tables included), which is what pytorch_model.bin files on the hub hold.
"""

import io
import json

import sentencepiece as spm
import torch
from safetensors.torch import save as safetensors_bytes

from pegasus import Pegasus, PegasusConfig, sinusoids
from pegasus_x import PegasusX, PegasusXConfig
from tokenizer import OFFSET

CORPUS = ["The city council voted on Tuesday to close the old bridge.",
          "Heavy rain is expected across the region later this week.",
          "The company said profits rose by ten percent in the last quarter.",
          "Scientists found a new species of frog in the forest."] * 5
SPIECE_PIECES = 40


def tiny_spiece() -> bytes:
    """A SentencePiece unigram model with PEGASUS's special ids (pad 0, eos 1, unk 2), as bytes."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=SPIECE_PIECES,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   user_defined_symbols=["<n>"], minloglevel=2, num_threads=1)
    return out.getvalue()


def tiny_model(kind: str = "pegasus", seed: int = 0):
    torch.manual_seed(seed)
    shape = dict(vocab_size=OFFSET + SPIECE_PIECES, d_model=16, encoder_layers=1, decoder_layers=1,
                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    if kind == "pegasus":
        model = Pegasus(PegasusConfig(max_position_embeddings=64, **shape))
    else:
        model = PegasusX(PegasusXConfig(max_position_embeddings=256, block_size=16, num_global_tokens=4, **shape))
    model.generation_config = {"num_beams": 2, "max_length": 6, "length_penalty": 0.6}
    return model.eval()


def config_json(model) -> bytes:
    from dataclasses import asdict
    arch = {"pegasus": "PegasusForConditionalGeneration", "pegasus_x": "PegasusXForConditionalGeneration"}
    cfg = asdict(model.config) | {"architectures": [arch[model.config.model_type]], "is_encoder_decoder": True}
    return json.dumps(cfg, indent=2).encode()


def reference_state(model, dtype=None) -> dict[str, torch.Tensor]:
    """The tensors as transformers' save_pretrained writes them into pytorch_model.bin."""
    state = {(k if k == "final_logits_bias" else f"model.{k}"): v.detach().clone()
             for k, v in model.state_dict().items()}
    shared = state["model.shared.weight"]
    for k in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        state[k] = shared.clone()
    if model.config.model_type == "pegasus":
        table = sinusoids(model.config.max_position_embeddings, model.config.d_model)
        state["model.encoder.embed_positions.weight"] = table.clone()
        state["model.decoder.embed_positions.weight"] = table.clone()
    state = {k: v for k, v in state.items() if "embed_positions" in k or k in {
        *(f"model.{n}" for n in model.state_dict()), "final_logits_bias", "lm_head.weight",
        "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}}
    return {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}


def torch_bytes(state: dict, legacy: bool = False) -> bytes:
    """torch.save'd bytes; legacy=True writes the pre-1.6 (non-zip) format old checkpoints have."""
    out = io.BytesIO()
    torch.save(state, out, _use_new_zipfile_serialization=not legacy)
    return out.getvalue()


def sharded(state: dict, n: int, fmt: str) -> dict[str, bytes]:
    """`state` split into n shards plus the index, named as transformers names them."""
    keys = sorted(state)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    files, weight_map = {}, {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
        part = {k: state[k].contiguous() for k in keys[i::n]}
        files[name] = safetensors_bytes(part) if fmt == "safetensors" else torch_bytes(part)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files[f"{stem}.{ext}.index.json"] = json.dumps(index).encode()
    return files


def repository(model, spiece: bytes, weights: str = "bin", extra: dict | None = None) -> dict[str, bytes]:
    """The files of a hub repository laid out like google/pegasus-xsum (2020): config, generation
    config, tokenizer files, pytorch_model.bin, and TensorFlow / Flax weights we must never fetch.
    weights: "bin", "legacy-bin", "sharded-bin", "safetensors", "sharded-safetensors" or
    "safetensors+bin" (both, as repositories converted later have)."""
    state = reference_state(model)
    files = {
        ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"---\nlanguage: en\n---\n# tiny pegasus\n",
        "config.json": config_json(model),
        "generation_config.json": json.dumps(model.generation_config | {"decoder_start_token_id": 0}).encode(),
        "spiece.model": spiece,
        "tokenizer.json": b'{"never": "read: spiece.model comes first"}',
        "tokenizer_config.json": json.dumps({"model_max_length": 64}).encode(),
        "special_tokens_map.json": json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}).encode(),
        "tf_model.h5": b"TensorFlow weights: must not be downloaded",
        "flax_model.msgpack": b"Flax weights: must not be downloaded",
        "rust_model.ot": b"Rust weights: must not be downloaded",
    }
    if weights in ("bin", "safetensors+bin"):
        files["pytorch_model.bin"] = torch_bytes(state)
    if weights == "legacy-bin":
        files["pytorch_model.bin"] = torch_bytes(state, legacy=True)
    if weights in ("safetensors", "safetensors+bin"):
        files["model.safetensors"] = safetensors_bytes({k: v.contiguous() for k, v in state.items()},
                                                       metadata={"format": "pt"})
    if weights.startswith("sharded-"):
        files.update(sharded(state, 2, weights.removeprefix("sharded-")))
    return files | (extra or {})


def write(directory, files: dict[str, bytes]):
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
