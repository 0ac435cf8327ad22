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
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from hub import resolve
from memory import give_back_freed_memory, returning_freed_memory
from pegasus import REQUIRED_FIELDS, Pegasus, PegasusConfig, sinusoids
from quantize import float_state_dict, pack_all, quantize_model, quantize_weight
from tokenizer import PegasusTokenizer
from weight_files import Rows, iter_tensors, same_bytes

# Keys the reference stores but we derive: tied copies of `shared` and the fixed position tables.
TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
GENERATION_KEYS = ("num_beams", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
                   "early_stopping", "forced_eos_token_id", "decoder_start_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


def read_config(ckpt: Path):
    """(model class, config, raw config.json dict); a bad file gets one ValueError naming it and the field."""
    file = ckpt / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{ckpt} has no config.json; is it a Hugging Face checkpoint directory?")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{file} is not valid JSON: {getattr(e, 'msg', e)}") from None
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got a {type(raw).__name__}")
        missing = [k for k in REQUIRED_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"missing required field(s) {', '.join(missing)}")
        cls, config_cls = model_class(raw.get("model_type"))
        config = config_cls.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return cls, config, raw


def load_model(name_or_path, dtype=torch.float32, device="cpu", with_tokenizer: bool = True, mmap: bool = True,
               revision: str | None = None, original: bool = False, quantize: str | None = None,
               step_rows: int | None = None):
    """Returns (model, tokenizer) from a checkpoint directory or a hub id such as google/pegasus-xsum
    (at `revision`: a branch, tag or commit; default main). The weights may be stored in any float
    dtype; they are converted to `dtype`.

    original=True runs the checkpoint as the original TF code did: the sinusoid frequencies it was
    trained with (pegasus.sinusoids "original"; PEGASUS-X uses them anyway), for PEGASUS a zero vector
    as the first decoder input (not the embedded start token), and a tokenizer that
    maps newlines to the "<n>" piece and back. Decode with search="original" to complete the set
    (generate.summarize(..., original=True) does all three).

    quantize="int8" (CPU, float32 activations): every linear layer and the tied embedding / output
    head in int8 (quantize.py), quantized tensor by tensor as the checkpoint is read: the float
    model is never built, so memory peaks near the int8 model plus one float tensor. step_rows (int8
    only): the hypotheses per decoding step the caller will run, a hint for the kernels
    (quantize.quantize_model)."""
    dtype = parse_dtype(dtype)
    if quantize not in (None, "int8"):
        raise ValueError(f"unsupported quantize={quantize!r}; the only scheme is 'int8'")
    if quantize and dtype != torch.float32:
        raise ValueError("quantize='int8' keeps float32 activations; leave dtype at float32")
    ckpt = resolve(str(name_or_path), revision)
    cls, config, raw = read_config(ckpt)
    if original:
        # PEGASUS-X already uses the TF sinusoids; the zero first decoder input is the PEGASUS TF code's
        # (pegasus/models/transformer.py), not known to hold for PEGASUS-X's Flax code, so it is left alone.
        config = replace(config, position_formula="original", zero_first_decoder_input=config.model_type == "pegasus")
    generation = generation_config(ckpt, raw)
    cls.check_dtype(dtype)  # PEGASUS-X refuses float16 (see pegasus_x.py)
    with torch.device("meta"):  # shapes only: no memory, no random init
        try:
            model = cls(config)  # the model's own checks too (e.g. PEGASUS-X block sizes)
        except ValueError as e:
            raise ValueError(f"{ckpt / 'config.json'}: {e}") from None
        if quantize:
            quantize_model(model, step_rows)  # the int8 skeleton: int8 `weight` + float `scale` for each matrix
    tokenizer = None
    if with_tokenizer:  # read before the weights: a mismatch should fail fast
        tokenizer = PegasusTokenizer.from_pretrained(ckpt, newline_to_n=original)
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"tokenizer in {ckpt} has {tokenizer.vocab_size} ids but the model expects "
                             f"{config.vocab_size}: they are not from the same checkpoint")

    expected = model.state_dict()  # names and shapes (meta tensors)
    by_rows = bool(quantize) or dtype != torch.float32  # int8 or converted: mapped, a matrix stays resident whole
    with returning_freed_memory() if by_rows or not mmap else nullcontext():
        state, copies, early = {}, {}, set()
        # int8: the shared table first, so that the output head is packed before the other matrices are read
        for key, t in iter_tensors(ckpt, mmap and not by_rows, rows=by_rows, first="model.shared.weight"):
            name = key.removeprefix("model.")
            int8 = quantize and expected.get(name, t).dtype == torch.int8
            if not t.is_floating_point():  # an int or bool tensor would be silently converted into garbage
                raise ValueError(f"{key} in {ckpt} has dtype {str(t.dtype).removeprefix('torch.')}, not a float "
                                 f"type: this is not a weight this model can use")
            if key in TIED or key in POSITIONS:
                copies[key] = t  # derived tensors, as stored (Rows: not read yet): checked below, never loaded
                continue
            if name == "shared.weight":
                copies[name] = t  # as stored: what the tied copies must equal
            if isinstance(t, Rows) and not int8:  # converted a block of rows at a time (quantize_weight reads its own)
                t = t.to(dtype)
            if name not in expected:
                raise ValueError(f"unexpected tensor {key!r} in {ckpt} (does config.json match the weights?)")
            if t.shape != expected[name].shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape "
                                 f"{tuple(expected[name].shape)}")
            if int8 and name == "shared.weight" and isinstance(t, Rows) and torch.device(device).type == "cpu":
                # The output head is packed now, while little else is resident (the table is read first):
                # packing holds the int8 table twice (what fbgemm packs from, and the result). Packed after the
                # other matrices, that came on top of the whole int8 model: a load peak of 913-953 MiB where the
                # model rests at 819 (pegasus-xsum shape). Lookups read the checkpoint's float rows from the file
                # and quantize them, so packing can let go of the plain int8 table (98 MB; quantize.py).
                model.shared.weight, model.shared.scale = quantize_weight(t)
                model.shared.lookup_from(t.reader()).pack()
                early = {"shared.weight", "shared.scale"}  # loaded: load_state_dict below leaves them alone
                continue
            if int8:  # a matrix: int8 rows and a scale per row
                state[name], state[name.removesuffix("weight") + "scale"] = quantize_weight(t)
                continue
            state[name] = t.to(device=device, dtype=dtype)
        if "final_logits_bias" in expected and "final_logits_bias" not in state:  # some exports omit it: zeros
            state["final_logits_bias"] = torch.zeros(expected["final_logits_bias"].shape, dtype=dtype, device=device)
        missing = sorted(set(expected) - set(state) - early)
        if missing:
            raise ValueError(f"{ckpt} is missing {len(missing)} tensors, e.g. {missing[:3]}")
        check_copies(copies, ckpt, config.model_type)
        left = model.load_state_dict(state, assign=True, strict=not early)
        assert set(left.missing_keys) <= early and not left.unexpected_keys, left  # early: the head, loaded above
        state.clear()  # the model holds the tensors now; packing below can free each plain int8 one
        copies.clear()
        model.init_buffers()  # the position table was built on the meta device
        if torch.device(device).type != "cpu":  # (on the CPU everything is in place; .to() would unpack the head)
            model.to(device)
        if quantize:  # the kernels' packed layouts now, once, rather than on the first forward
            give_back_freed_memory()  # what reading left in the heap (int8 pegasus-xsum: ~0; 0-45 MiB before)
            pack_all(model)
    model.generation_config = generation
    model.encode_each |= dtype != torch.float32 and torch.device(device).type == "cpu"  # bf16/fp16: decoding.encode
    return model.eval(), tokenizer


def check_copies(copies: dict, ckpt: Path, model_type: str):
    """The stored copies of derived tensors (TIED, POSITIONS) against what they must equal: the shared
    embedding as stored (copies["shared.weight"]) and the sinusoid tables. A tied copy that is the same
    bytes as the shared embedding (one storage in a .bin: weight_files.same_bytes) needs no reading."""
    shared = copies["shared.weight"]
    for key, t in copies.items():
        if key == "shared.weight" or (key in TIED and same_bytes(t, shared)):
            continue
        # An untied output head or another position formula would silently give other logits. The
        # stored copy was rounded to its stored dtype (a float16 table differs from the float32
        # sinusoids by up to ~5e-4, a bfloat16 one by ~4e-3): allow one unit of that rounding.
        ref = shared if key in TIED or t.dim() != 2 else sinusoids(t.size(0), t.size(1))
        if not close_copy(t, ref):
            what = "shared embedding" if key in TIED else "sinusoid table"
            raise ValueError(f"{key} in {ckpt} does not equal the {what} it should be a copy of; "
                             f"this checkpoint is not a standard {model_type}")


def close_copy(t, ref) -> bool:
    """allclose within one unit of the coarser dtype's rounding, compared a block of rows at a time:
    a stored copy of the embedding (Rows, 394 MB in float32 at pegasus-xsum shape) is never read whole.
    float64 blocks: copies, so a Rows block (a buffer the next read overwrites) outlives that read."""
    coarsest = max(torch.finfo(t.dtype).eps, torch.finfo(ref.dtype).eps)
    if tuple(t.shape) != tuple(ref.shape):
        return False
    step = max(1, 2**16 // max(1, t.shape[-1]))  # rows per block (512 KB in float64)
    for i in range(0, t.shape[0], step):
        if not torch.allclose(t[i: i + step].double(), ref[i: i + step].double(), rtol=coarsest,
                              atol=max(coarsest, 1e-4)):
            return False
    return True


def generation_config(ckpt: Path, raw_config: dict) -> dict:
    """Decoding defaults: legacy keys in config.json, overridden by generation_config.json."""
    gen = {k: raw_config[k] for k in GENERATION_KEYS if k in raw_config}
    file = ckpt / "generation_config.json"
    if file.exists():
        try:
            g = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {getattr(e, 'msg', e)}") from None
        if not isinstance(g, dict):
            raise ValueError(f"{file}: expected a JSON object, got a {type(g).__name__}")
        gen.update({k: g[k] for k in GENERATION_KEYS if k in g})
    return gen


def save_model(model, directory, tokenizer: PegasusTokenizer | None = None):
    """Write `model` in the Hugging Face layout, loadable here and by transformers' from_pretrained.
    Refuses (before writing anything) a model whose weights onednn.use_onednn packed: safetensors
    cannot write oneDNN's opaque layout. An int8 model (quantize.py) is written as the float32
    weights it computes with (quantize.float_state_dict): a float checkpoint that anything loads,
    and that load_model(..., quantize="int8") turns back into the same int8 values."""
    from dataclasses import asdict

    from safetensors.torch import save_file
    state = float_state_dict(model.state_dict())
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
    # Written beside and then renamed over the old file: a model loaded from this directory may still read
    # the old one (float32 weights through a memory map, an int8 model's lookups from its open file), which a
    # rewrite in place would change under it (or cut short); and an interrupted save leaves no half-written file.
    tmp = out / f".model.safetensors.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as config.json: safetensors 0.8 writes its files readable by the owner only
        os.replace(tmp, out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:  # the SentencePiece model, whichever file it was read from
        (out / "spiece.model").write_bytes(tokenizer.sp.serialized_model_proto())
