"""Load (and save) published PEGASUS / PEGASUS-X checkpoints in the Hugging Face layout.

A checkpoint directory holds `config.json` (architecture), `generation_config.json` (decoding
defaults), the weights (`model.safetensors`, a sharded `model.safetensors.index.json`, or a
legacy `pytorch_model.bin`) and the vocabulary (`spiece.model` or `tokenizer.json`).

Loading is an explicit name map with checks: every tensor the model needs must be present with
the right shape, nothing unexpected may be left over, and copies of tied or computed tensors are
compared with what they must equal instead of being trusted. The model is built on the `meta`
device (no memory) and the loaded tensors are assigned in place, so peak memory stays near one
copy of the weights.
"""

import json
from pathlib import Path

import torch

from pegasus import Pegasus, PegasusConfig, sinusoids
from tokenizer import PegasusTokenizer

# Keys the reference stores but we derive: tied copies of `shared` and the fixed position tables.
TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
GENERATION_KEYS = ("num_beams", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
                   "early_stopping", "forced_eos_token_id", "decoder_start_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "spiece.model", "tokenizer.json", "tokenizer_config.json"]


def model_class(model_type: str):
    if model_type == "pegasus":
        return Pegasus, PegasusConfig
    if model_type == "pegasus_x":
        from pegasus_x import PegasusX, PegasusXConfig  # imported lazily: it builds on this module's model
        return PegasusX, PegasusXConfig
    raise ValueError(f"config.json has model_type {model_type!r}; only 'pegasus' and 'pegasus_x' can be loaded")


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")


def resolve(name_or_path: str) -> Path:
    """A local directory, or a hub id fetched into (or read from) the standard hub cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory that contains config.json")
        return path
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    from huggingface_hub import snapshot_download  # shows tqdm progress bars while downloading
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=HUB_FILES))
    except Exception as e:
        try:  # some older checkpoints ship only pytorch_model.bin; also covers a cached copy when offline
            return Path(snapshot_download(name_or_path, allow_patterns=HUB_FILES + ["pytorch_model.bin"],
                                          local_files_only=True))
        except Exception:
            raise FileNotFoundError(
                f"could not download {name_or_path!r} ({type(e).__name__}) and it is not in the Hugging Face cache; "
                f"on a machine with internet run `hf download {name_or_path}` (or copy its directory here and pass "
                f"the path)") from None


def read_tensors(ckpt: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: memory-mapped (pages read on first use), or read into ordinary
    memory, where each tensor can be freed on its own (what onednn.use_onednn needs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (ckpt / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (ckpt / "pytorch_model.bin").exists():  # legacy pickle: weights_only refuses arbitrary code
        return torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=mmap)
    else:
        raise FileNotFoundError(f"no weights in {ckpt} (expected model.safetensors, "
                                f"model.safetensors.index.json or pytorch_model.bin)")
    tensors = {}
    for f in files:
        if not (ckpt / f).exists():
            raise FileNotFoundError(f"{ckpt / f} is listed in the shard index but missing")
        try:
            tensors.update(load_file(ckpt / f, backend="mmap" if mmap else "pread"))
        except SafetensorError as e:
            raise ValueError(f"{ckpt / f} is not a valid safetensors file (corrupt or truncated?): {e}") from None
    return tensors


def load_model(name_or_path, dtype=torch.float32, device="cpu", with_tokenizer: bool = True, mmap: bool = True):
    """Returns (model, tokenizer) from a checkpoint directory or a hub id such as google/pegasus-xsum."""
    dtype = parse_dtype(dtype)
    ckpt = resolve(str(name_or_path))
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt} has no config.json; is it a Hugging Face checkpoint directory?")
    raw = json.loads((ckpt / "config.json").read_text())
    cls, config_cls = model_class(raw.get("model_type"))
    config = config_cls.from_dict(raw)
    cls.check_dtype(dtype)  # PEGASUS-X refuses float16 (see pegasus_x.py)
    tokenizer = None
    if with_tokenizer:  # read before the weights: a mismatch should fail fast
        tokenizer = PegasusTokenizer.from_pretrained(ckpt)
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"tokenizer in {ckpt} has {tokenizer.vocab_size} ids but the model expects "
                             f"{config.vocab_size}: they are not from the same checkpoint")

    with torch.device("meta"):  # shapes only: no memory, no random init
        model = cls(config)
    expected = model.state_dict()  # names and shapes (meta tensors)
    state, copies = {}, {}
    for key, t in read_tensors(ckpt, mmap).items():
        if key in TIED or key in POSITIONS:
            copies[key] = t  # derived tensors: checked below, never loaded
            continue
        name = key.removeprefix("model.")
        if name not in expected:
            raise ValueError(f"unexpected tensor {key!r} in {ckpt} (does config.json match the weights?)")
        if t.shape != expected[name].shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(expected[name].shape)}")
        state[name] = t.to(device=device, dtype=dtype)
    if "final_logits_bias" in expected and "final_logits_bias" not in state:  # some exports omit it: zeros
        state["final_logits_bias"] = torch.zeros(expected["final_logits_bias"].shape, dtype=dtype, device=device)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{ckpt} is missing {len(missing)} tensors, e.g. {missing[:3]}")
    for key, t in copies.items():
        # An untied output head or another position formula would silently give other logits.
        ref = state["shared.weight"] if key in TIED else sinusoids(t.size(0), t.size(1)).to(device)
        if t.shape != ref.shape or not torch.allclose(t.to(device=device, dtype=ref.dtype), ref, atol=1e-4):
            what = "shared embedding" if key in TIED else "sinusoid table"
            raise ValueError(f"{key} in {ckpt} does not equal the {what} it should be a copy of; "
                             f"this checkpoint is not a standard {config.model_type}")
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers()  # the position table was built on the meta device
    model.to(device)
    model.generation_config = generation_config(ckpt, raw)
    return model.eval(), tokenizer


def generation_config(ckpt: Path, raw_config: dict) -> dict:
    """Decoding defaults: legacy keys in config.json, overridden by generation_config.json."""
    gen = {k: raw_config[k] for k in GENERATION_KEYS if k in raw_config}
    if (ckpt / "generation_config.json").exists():
        g = json.loads((ckpt / "generation_config.json").read_text())
        gen.update({k: g[k] for k in GENERATION_KEYS if k in g})
    return gen


def save_model(model, directory, tokenizer: PegasusTokenizer | None = None):
    """Write `model` in the Hugging Face layout, loadable here and by transformers' from_pretrained.
    Refuses (before writing anything) a model whose weights onednn.use_onednn packed: safetensors
    cannot write oneDNN's opaque layout."""
    from dataclasses import asdict

    from safetensors.torch import save_file
    state = model.state_dict()
    if any(t.is_mkldnn for t in state.values()):
        raise ValueError("cannot save a model with oneDNN-packed weights (onednn.use_onednn): save it before "
                         "converting, or load the checkpoint again without use_onednn")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.config)
    arch = {"pegasus": "PegasusForConditionalGeneration", "pegasus_x": "PegasusXForConditionalGeneration"}
    cfg.update(architectures=[arch[cfg["model_type"]]], is_encoder_decoder=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    # The special ids too: transformers' generate() reads them from this file, not from config.json.
    special = {k: cfg[k] for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "forced_eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps({**special, **model.generation_config}, indent=2))
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    tensors["final_logits_bias"] = tensors.pop("model.final_logits_bias", None)
    if tensors["final_logits_bias"] is None:
        del tensors["final_logits_bias"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:  # the SentencePiece model, whichever file it was read from
        (out / "spiece.model").write_bytes(tokenizer.sp.serialized_model_proto())
