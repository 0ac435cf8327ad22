"""Summarize with PEGASUS: `python generate.py "some article"` prints its summary (see --help).

The application on top of decoding.py (the decoding algorithms, with its options object): a
process-wide cache that loads each checkpoint once and converts it for the fast CPU path
(onednn.py), `summarize()` (texts in, summaries out, like the reference's summarization
pipeline), and the command line. `generate` and `DecodingOptions` are re-exported from decoding.py,
so `from generate import generate, summarize` works.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data import read_records
from decoding import DecodingOptions, generate
from load_weights import load_model
from onednn import screened_argmax, use_onednn

__all__ = ["DecodingOptions", "generate", "load", "summarize", "main"]


# ----------------------------------------------------------------------------- summarization

_LOADED = {}  # (name, dtype, device) -> (model, tokenizer): summarize() loads each checkpoint once
_ARGMAX = {}  # id(model) -> greedy's screened argmax (onednn.ScreenedArgmax) for the models load() made


def load(name_or_path, dtype="float32", device="cpu"):
    """(model, tokenizer) from a hub id or a checkpoint directory, cached for this process; float32
    on CPU runs its matmuls through oneDNN (use_onednn) and greedy decoding's argmax through
    onednn.ScreenedArgmax, which summarize() passes to generate() for these models."""
    key = (str(name_or_path), str(dtype), str(device))
    if key not in _LOADED:
        # Not memory-mapped: use_onednn then frees each original weight as it converts it.
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, mmap=False)
        _LOADED[key] = use_onednn(model), tokenizer
        _ARGMAX[id(model)] = screened_argmax(model)
    return _LOADED[key]


def summarize(texts, model="google/pegasus-xsum", *, batch_size: int = 8, dtype="float32", device="cpu",
              progress: bool = False, stats: dict | None = None, **generation_args) -> list[str]:
    """Summaries of a text or a list of texts: what the reference's pipeline("summarization") gives.
    `model` is a hub id, a directory (both loaded once, see load) or a (model, tokenizer) pair, used
    as it is; generation_args go to generate() (options=DecodingOptions(...) and/or its keyword
    overrides). `stats`, if given, receives token count and time."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("empty input: every text to summarize must be a non-empty string")
    net, tok = model if isinstance(model, tuple) else load(model, dtype, device)
    generation_args.setdefault("argmax", _ARGMAX.get(id(net)))  # None (the full argmax) for models load() did not make
    limit, eos, device = net.config.max_position_embeddings, net.config.eos_token_id, net.shared.weight.device
    encoded = [tok.encode(t) for t in texts]
    for i, ids in enumerate(encoded):
        if len(ids) > limit:  # the model has no positions beyond its table: keep the start, as the reference does
            print(f"note: text {i + 1} has {len(ids)} tokens; truncated to the model's {limit}", file=sys.stderr)
            encoded[i] = ids[: limit - 1] + [eos]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    summaries, n_tokens, started = [None] * len(texts), 0, time.perf_counter()
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, unit="batch", disable=not progress, file=sys.stderr):
        rows = [encoded[i] for i in idx]
        lengths, width = torch.tensor([len(r) for r in rows], device=device), max(map(len, rows))  # (b,)
        ids = torch.tensor([r + [net.config.pad_token_id] * (width - len(r)) for r in rows], device=device)  # (b, S)
        mask = (torch.arange(width, device=device) < lengths[:, None]).long()  # (b, S), right padding
        out = generate(net, ids, mask, **generation_args)
        if out.size(0) != len(idx):
            raise ValueError("summarize gives one summary per text; num_return_sequences must be 1")
        for i, row in zip(idx, out[:, 1:].tolist()):
            row = row[: row.index(eos)] if eos in row else row
            n_tokens += len(row)
            summaries[i] = tok.decode(row)
    if stats is not None:
        stats.update(tokens=n_tokens, seconds=time.perf_counter() - started)
    return summaries


# ----------------------------------------------------------------------------- command line


def read_documents(args) -> tuple[list[str], list[dict] | None]:
    """The texts to summarize, and for .jsonl input the records they came from."""
    if args.text is not None and args.file is not None:
        raise ValueError("give the text as an argument or with --file, not both")
    if args.file is None:
        if args.text is None and sys.stdin.isatty():
            raise ValueError("no input: pass the text as an argument, use --file, or pipe it on standard input")
        text = sys.stdin.read() if args.text is None else args.text
        if not text.strip():
            raise ValueError("the input text is empty")
        return [text], None
    if args.file.suffix == ".jsonl":  # the same reader as train.py's
        records = read_records(args.file, ("text",))
        return [r["text"] for r in records], records
    try:
        texts = [line for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None
    if not texts:
        raise ValueError(f"{args.file} contains no documents")
    return texts, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Summarize text with PEGASUS. The text comes from the argument, --file, or standard input.",
        epilog="examples:\n"
               '  python generate.py "The city council voted on Tuesday to ..."\n'
               "  cat article.txt | python generate.py --model google/pegasus-cnn_dailymail\n"
               "  python generate.py --file articles.jsonl --output summaries.jsonl --num-beams 4 --verbose",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", help="the document to summarize")
    add = p.add_argument
    add("--model", metavar="NAME", default="google/pegasus-xsum", help="hub id or checkpoint directory (%(default)s)")
    add("--file", metavar="PATH", type=Path, help="documents: .txt with one per line, or .jsonl with a 'text' field "
                                                   "per line (written back with a 'summary' field)")
    add("--output", metavar="PATH", type=Path, help="write the summaries here instead of standard output")
    add("--num-beams", metavar="N", type=int, help="beam width (default: the checkpoint's, 8 for the published ones)")
    add("--max-new-tokens", metavar="N", type=int, help="longest summary in tokens (default: the checkpoint's)")
    add("--length-penalty", metavar="X", type=float, help="beam scores are divided by length ** X; X > 0 favours "
                                                          "longer summaries (default: the checkpoint's)")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="weight precision (default: %(default)s; float16 needs a GPU)")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (default: %(default)s)")
    add("--batch-size", metavar="N", type=int, default=8, help="documents decoded together (default: %(default)s)")
    add("--verbose", action="store_true", help="print load time, speed and peak memory to stderr")
    args = p.parse_args(argv)
    try:  # problems with what was asked: exit status 2
        if args.dtype == "float16" and args.device == "cpu":
            raise ValueError("float16 is not supported on CPU; use --dtype float32 or bfloat16, or a GPU")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA GPU is available")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        texts, records = read_documents(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # problems with the model: exit status 1
        started, stats = time.perf_counter(), {}
        model = load(args.model, args.dtype, args.device)
        loaded = time.perf_counter() - started
        summaries = summarize(texts, model, batch_size=args.batch_size, stats=stats,
                              progress=len(texts) > args.batch_size, num_beams=args.num_beams,
                              max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if records is not None:
        summaries = [json.dumps(r | {"summary": s}, ensure_ascii=False) for r, s in zip(records, summaries)]
    if args.output is not None:
        args.output.write_text("".join(line + "\n" for line in summaries), encoding="utf-8")
    else:
        print("\n".join(summaries))
    if args.verbose:
        peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
        print(f"loaded {args.model} in {loaded:.1f} s; {stats['tokens']} summary tokens in {stats['seconds']:.1f} s "
              f"({stats['tokens'] / stats['seconds']:.1f} tokens/s); peak memory {peak / 2**30:.2f} GiB",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
