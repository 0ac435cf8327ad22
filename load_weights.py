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
import mmap
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from hub import files_needed, resolve, shard_files
from pegasus import REQUIRED_FIELDS, Pegasus, PegasusConfig, sinusoids
from quantize import float_state_dict, pack_all, quantize_model, quantize_weight
from tokenizer import PegasusTokenizer

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


def read_bin(file: Path, mmap: bool) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict. weights_only=True refuses pickles that would run arbitrary code.
    Files from torch < 1.6 are not zip archives and cannot be memory-mapped: read those whole."""
    import pickle
    import zipfile
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise ValueError(f"{file} is refused as unsafe: it holds Python objects other than tensors, which "
                             f"loading would have to execute") from None
        raise ValueError(f"{file} is not a valid PyTorch checkpoint (corrupt or truncated?)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a valid PyTorch checkpoint (corrupt or truncated?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return state


def read_tensors(ckpt: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: memory-mapped (pages read on first use, each tensor's let go when
    it is freed: mapped_tensors), or read into ordinary memory."""
    return dict(iter_tensors(ckpt, mmap))


# safetensors' dtype names; the rest (float8, unsigned ints) are read as bytes and refused as "not a float".
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def mapped_tensors(file: Path):
    """(name, tensor) for every tensor of a safetensors file, each a view of one copy-on-write memory
    map of the file: nothing is read until a tensor is used, and then straight from the page cache
    (no copy; writing to a tensor never changes the file). Each tensor lets go of its own pages when
    it is freed (madvise DONTNEED), so a converter that replaces the weights one by one
    (onednn.use_onednn packs each into a new layout) never holds the file's pages beside its copies:
    measured at pegasus-xsum shape, this loads and packs in 2.2 s on one core where reading every
    tensor into fresh memory first took 4.1 s (1.5 s of that was page faults on the fresh memory)."""
    header, begin = Rows.header(file)
    header.pop("__metadata__", None)
    with open(file, "rb") as f:
        whole = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))  # the map outlives the file handle
    for name, info in header.items():
        first, last = (begin + offset for offset in info["data_offsets"])
        dtype = SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8)
        if last == first:  # frombuffer refuses an empty buffer
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        view = whole[first:last]
        pages = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE, last // mmap.PAGESIZE * mmap.PAGESIZE  # wholly its own
        if pages[1] > pages[0] and hasattr(whole.obj, "madvise"):  # not on Windows
            weakref.finalize(view, whole.obj.madvise, mmap.MADV_DONTNEED, pages[0], pages[1] - pages[0]).atexit = False
        yield name, torch.frombuffer(view, dtype=dtype).view(info["shape"])  # the tensor holds `view`


class Rows:
    """A 2-D tensor of a safetensors file, read a block of rows at a time (straight from its offset in
    the file into the block's memory): quantize.quantize_weight needs only its shape and row slices,
    so the int8 path never holds a whole float matrix (394 MB for the embedding table at pegasus-xsum
    shape), and its small blocks reuse memory the allocator already has, where a fresh full tensor
    costs a page fault per 4 KB. (safetensors' own get_slice reads the whole tensor first.) The
    format: an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape and
    byte range after the header, then the bytes."""

    device = torch.device("cpu")

    def __init__(self, file: Path, start: int, shape: list[int], dtype: str):
        self.file, self.start, self.shape = file, start, torch.Size(shape)
        self.dtype = SAFETENSORS_DTYPES.get(dtype, torch.uint8)  # not a float: refused by the caller

    @staticmethod
    def header(file: Path) -> tuple[dict, int]:
        """(the JSON header, where the tensor bytes begin)."""
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n)), 8 + n

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getitem__(self, rows: slice) -> torch.Tensor:  # (r, D); clipped at the end, as tensor slicing is
        first, last = rows.start, min(rows.stop, self.shape[0])
        row_bytes = self.shape[1] * self.dtype.itemsize
        block = torch.empty((last - first) * row_bytes, dtype=torch.uint8)  # the file's bytes land here directly
        view, done = memoryview(block.numpy()), 0
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.start + first * row_bytes)
            while done < len(view) and (n := f.readinto(view[done:])):
                done += n
        if done < len(view):
            raise ValueError(f"{self.file} ends inside a tensor: it is truncated")
        return block.view(self.dtype).view(last - first, self.shape[1])


def iter_tensors(ckpt: Path, mmap: bool = True, rows: bool = False):
    """(name, tensor) for every tensor of a checkpoint, one at a time. Without mmap a safetensors
    tensor is read (pread) only when its turn comes, so a caller that converts each one and drops it
    (load_model's int8 path) never holds more than one float tensor; with rows=True every 2-D one
    comes as Rows, read in blocks of rows by whoever uses it."""
    from safetensors import SafetensorError, safe_open
    _, weights = files_needed({p.name for p in ckpt.iterdir()}, str(ckpt))
    files = shard_files(ckpt / weights) if weights.endswith(".index.json") else [weights]
    for f in files:
        if not (ckpt / f).is_file():
            raise FileNotFoundError(f"{ckpt / f} is listed in the shard index {weights} but missing")
    for f in files:
        if not f.endswith(".safetensors"):
            state = read_bin(ckpt / f, mmap)
            for name in list(state):
                yield name, state.pop(name)
            continue
        try:
            with safe_open(ckpt / f, framework="pt", backend="pread") as tensors:  # it checks the header and size
                if mmap:
                    yield from mapped_tensors(ckpt / f)
                    continue
                header, begin = Rows.header(ckpt / f) if rows else ({}, 0)
                for name in list(tensors.keys()):
                    info = header.get(name, {})
                    if len(info.get("shape", ())) == 2:  # a matrix: read by blocks of rows
                        yield name, Rows(ckpt / f, begin + info["data_offsets"][0], info["shape"], info["dtype"])
                    else:
                        yield name, tensors.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{ckpt / f} is not a valid safetensors file (corrupt or truncated?): {e}") from None


_RETURNING = 0  # how many returning_freed_memory blocks are open (they nest: generate.load wraps load_model)


@contextmanager
def returning_freed_memory():
    """Inside the block, glibc's malloc gives every large freed block straight back to the system
    (Linux; elsewhere nothing happens). Loading without mmap allocates a float tensor, converts it
    (int8, or oneDNN's packed copy) and frees it, hundreds of times. By default glibc raises its mmap
    threshold to the size of the largest block freed so far (up to 32 MB), after which such blocks
    come from the heap, where freed ones between live ones are kept, not returned: measured at
    pegasus-xsum shape, the int8 load then ended at 1.75 GB resident instead of 0.85 GB. A fixed
    threshold (M_MMAP_THRESHOLD, option -3) of 1 MB gives each large tensor its own mapping,
    released when it is freed.

    After the block the thresholds go to the ceilings glibc's own rule reaches (mmap 32 MB, trim
    64 MB; a fixed setting cannot be undone): left at 1 MB, every activation over 1 MB that
    decoding allocates would be a fresh mapping, zero-filled a page at a time (measured on this
    project's AVX2 EPYC, 2 threads: the PEGASUS-X encoder at 4,096 tokens in int8, ~6.1 s -> ~5.2 s)."""
    import ctypes
    global _RETURNING
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        mallopt = lambda option, value: None  # noqa: E731
    if _RETURNING == 0:
        mallopt(-3, 1 << 20)
    _RETURNING += 1
    try:
        yield
    finally:
        _RETURNING -= 1
        if _RETURNING == 0:
            mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
            mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


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
        with torch.device("meta"):  # the model's own checks (e.g. PEGASUS-X block sizes), at no cost
            cls(config)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return cls, config, raw


def load_model(name_or_path, dtype=torch.float32, device="cpu", with_tokenizer: bool = True, mmap: bool = True,
               revision: str | None = None, original: bool = False, quantize: str | None = None):
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
    model is never built, so memory peaks near the int8 model plus one float tensor."""
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
    tokenizer = None
    if with_tokenizer:  # read before the weights: a mismatch should fail fast
        tokenizer = PegasusTokenizer.from_pretrained(ckpt, newline_to_n=original)
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"tokenizer in {ckpt} has {tokenizer.vocab_size} ids but the model expects "
                             f"{config.vocab_size}: they are not from the same checkpoint")

    with torch.device("meta"):  # shapes only: no memory, no random init
        model = cls(config)
        if quantize:
            quantize_model(model)  # the int8 skeleton: int8 `weight` + float `scale` for each matrix
    expected = model.state_dict()  # names and shapes (meta tensors)
    with returning_freed_memory() if quantize or not mmap else nullcontext():
        state, copies = {}, {}
        # int8: each tensor read on its own (no mmap: mapped pages would stay resident) and quantized at once
        for key, t in iter_tensors(ckpt, mmap and not quantize, rows=bool(quantize)):
            int8 = quantize and (key in TIED or expected.get(key.removeprefix("model."), t).dtype == torch.int8)
            if isinstance(t, Rows) and not int8:  # only quantize_weight reads by rows
                t = t[0: t.size(0)]
            if not t.is_floating_point():  # an int or bool tensor would be silently converted into garbage
                raise ValueError(f"{key} in {ckpt} has dtype {str(t.dtype).removeprefix('torch.')}, not a float "
                                 f"type: this is not a weight this model can use")
            if key in TIED or key in POSITIONS:
                copies[key] = quantize_weight(t) if int8 else t  # derived tensors: checked below, never loaded
                continue
            name = key.removeprefix("model.")
            if name not in expected:
                raise ValueError(f"unexpected tensor {key!r} in {ckpt} (does config.json match the weights?)")
            if t.shape != expected[name].shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape "
                                 f"{tuple(expected[name].shape)}")
            if int8:  # a matrix: int8 rows and a scale per row
                state[name], state[name.removesuffix("weight") + "scale"] = quantize_weight(t)
                if name == "shared.weight":
                    copies[name] = state[name], state["shared.scale"]  # the tied copies are checked against these
                continue
            if name == "shared.weight":
                copies[name] = t  # kept as stored, to compare the tied copies with in their own precision
            state[name] = t.to(device=device, dtype=dtype)
        if "final_logits_bias" in expected and "final_logits_bias" not in state:  # some exports omit it: zeros
            state["final_logits_bias"] = torch.zeros(expected["final_logits_bias"].shape, dtype=dtype, device=device)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{ckpt} is missing {len(missing)} tensors, e.g. {missing[:3]}")
        shared = copies.pop("shared.weight")
        for key, t in copies.items():
            if quantize and key in TIED:  # int8 (q, scale) pairs: a copy rounded differently moves q by at most 1
                (q, s), (q0, s0) = t, shared
                if q.shape != q0.shape or (q.short() - q0).abs().max() > 1 or not torch.allclose(s, s0, rtol=1e-2):
                    raise ValueError(f"{key} in {ckpt} does not equal the shared embedding it should be a copy of; "
                                     f"this checkpoint is not a standard {config.model_type}")
                continue
            # An untied output head or another position formula would silently give other logits. The
            # stored copy was rounded to its stored dtype (a float16 table differs from the float32
            # sinusoids by up to ~5e-4, a bfloat16 one by ~4e-3): allow one unit of that rounding.
            ref = shared if key in TIED or t.dim() != 2 else sinusoids(t.size(0), t.size(1))
            coarsest = max(torch.finfo(t.dtype).eps, torch.finfo(ref.dtype).eps)
            close = t.shape == ref.shape and torch.allclose(t.float(), ref.float(), rtol=coarsest,
                                                            atol=max(coarsest, 1e-4))
            if not close:
                what = "shared embedding" if key in TIED else "sinusoid table"
                raise ValueError(f"{key} in {ckpt} does not equal the {what} it should be a copy of; "
                                 f"this checkpoint is not a standard {config.model_type}")
        model.load_state_dict(state, assign=True, strict=True)
        state.clear()  # the model holds the tensors now; packing below can free each plain int8 one
        model.init_buffers()  # the position table was built on the meta device
        model.to(device)
        if quantize:  # fbgemm's packed layout now, once, rather than on the first forward
            pack_all(model)
    model.generation_config = generation
    return model.eval(), tokenizer


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
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:  # the SentencePiece model, whichever file it was read from
        (out / "spiece.model").write_bytes(tokenizer.sp.serialized_model_proto())
