"""What the benchmarks share: one checkpoint builder, one loader for this project's variants, and
one worker protocol.

Worker protocol: `spawn(module, **kwargs)` runs `python -m benchmarks.<module> --worker '<kwargs as
JSON>'` in a fresh process from the repository root; that module ends with `serve(its_worker)`, which
calls its_worker(**kwargs) and prints the result as one JSON line, which spawn returns as a dict.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # the modules live flat at the repository root

# this project's variants; each benchmark adds the reference (and others)
IMPLS = ("ours", "ours+onednn", "ours+int8", "ours+bf16")


def huge_pages() -> str:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`; Linux) and THP_MEM_ALLOC_ENABLE if
    set: with `always`, or `madvise` and that variable, PyTorch's large tensors get 2 MB pages, which changed the
    times measured here (README, Speed and memory), transformers' most."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "none"
    setting = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return f"transparent huge pages: {mode}" + (f", THP_MEM_ALLOC_ENABLE={setting}" if setting is not None else "")


def verdict(ratio: float, bound: float) -> str:
    """How a measured ratio stands against one of the issue's targets (at most `bound`)."""
    return f"at most {bound:.2f}: {'met' if ratio <= bound else 'NOT met'}"


def spawn(module: str, **kwargs) -> dict:
    """Run benchmarks/<module>.py's worker in a fresh process; its result, or RuntimeError with its last error line."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--worker", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    """This process's peak resident memory in KiB: VmHWM of /proc/self/status (Linux). Not ru_maxrss,
    which a child inherits from its parent: Linux starts it at the parent's resident size at the fork,
    so a benchmark process holding a model would inflate every worker's figure."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def serve(worker) -> None:
    """In a module's `if __name__ == "__main__":`, before its own argument parsing: answer a spawn() call."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(**json.loads(sys.argv[2]))))
        sys.exit()


def load_ours(impl: str, checkpoint, step_rows: int | None = None):
    """(model, argmax) for "ours" (generate() as the tests check it, memory-mapped weights), "ours+onednn"
    (what the CLI runs for float32 on CPU: packed oneDNN matmuls, for `step_rows` hypotheses per
    decoding step as generate.load packs them, and the screened greedy argmax),
    "ours+int8" (what --quantize int8 runs: int8 weights, fbgemm's or oneDNN's kernels, the full argmax) or
    "ours+bf16" (what --dtype bfloat16 runs on CPU: bfloat16 weights packed for oneDNN where the CPU
    has bfloat16 kernels, and the screened greedy argmax)."""
    from load_weights import load_model
    from memory import returning_freed_memory
    from onednn import use_onednn
    from screen import screened_argmax

    if impl == "ours+int8":  # step_rows: the kernels' choice, as generate.load makes it (quantize.quantize_model)
        return load_model(checkpoint, with_tokenizer=False, mmap=False, quantize="int8", step_rows=step_rows)[0], None
    with returning_freed_memory():  # the allocator policy generate.load loads and packs under
        model, _ = load_model(checkpoint, with_tokenizer=False, dtype="bfloat16" if impl == "ours+bf16" else "float32")
        if impl in ("ours+onednn", "ours+bf16"):
            return use_onednn(model, step_rows), screened_argmax(model)
    return model, None


def build_checkpoint(name: str, out: Path) -> Path:
    """Random weights at a published shape (PEGASUS or PEGASUS-X), saved in the Hugging Face layout that
    both implementations load, with the real vocabulary when ../shared has it."""
    from load_weights import model_class, save_model
    from pegasus import PUBLISHED
    from pegasus_x import PUBLISHED as PUBLISHED_X
    from tokenizer import PegasusTokenizer

    published = SHARED / "configs" / "published.json"
    if published.exists():
        raw = json.loads(published.read_text())[name]
        generation = raw.get("generation", {})
    else:
        print(f"note: {published} not found; using the PUBLISHED tables")
        config = (PUBLISHED | PUBLISHED_X)[name]
        raw, generation = {f: getattr(config, f) for f in config.__dataclass_fields__}, {}
    cls, config_cls = model_class(raw["model_type"])
    config = config_cls.from_dict(raw)
    torch.manual_seed(0)
    model = cls(config)
    # The published generation_config.json files also name the special tokens; the reference needs them.
    model.generation_config = generation | {k: getattr(config, k) for k in (
        "decoder_start_token_id", "eos_token_id", "pad_token_id", "forced_eos_token_id")}
    spiece = SHARED / "pegasus" / "spiece.model"
    tok = PegasusTokenizer.from_spiece(spiece) if spiece.exists() else None
    if tok is None:
        print(f"note: {spiece} not found; timing random token ids instead of text")
    save_model(model, out, tok)
    return out


def as_published_bin(ckpt: Path, out: Path) -> Path:
    """`ckpt` re-saved as the 2020 google/pegasus-* repositories serve their weights: one
    pytorch_model.bin (torch's zip format) in which the shared embedding is stored once under its tied
    names too (the encoder's and decoder's embed_tokens: one storage), beside the same config and
    tokenizer files. Users of the published checkpoints load this layout, not safetensors."""
    import shutil

    from weight_files import read_tensors
    out.mkdir(parents=True, exist_ok=True)
    state = read_tensors(ckpt)  # memory-mapped: torch.save reads each tensor from the page cache
    for name in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        state[name] = state["model.shared.weight"]
    torch.save(state, out / "pytorch_model.bin")
    for f in ckpt.iterdir():
        if not f.name.startswith("model") and f.is_file():  # config, generation config, tokenizer files
            shutil.copy(f, out / f.name)
    return out
