"""Summarize with PEGASUS: `python generate.py "some article"` prints its summary (see --help).

The application on top of decoding.py (the decoding algorithms, with its options object): a
process-wide cache that loads each checkpoint once and converts it for the fast CPU path
(onednn.py), `summarize()` (texts in, summaries out, like the reference's summarization
pipeline), and the command line. `generate` and `DecodingOptions` are re-exported from decoding.py,
so `from generate import generate, summarize` works.
"""

import argparse
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import read_records
from decoding import DecodingOptions, generate
from distributed import setup_distributed
from hub import resolve
from load_weights import generation_config, load_model, read_config
from memory import returning_freed_memory
from onednn import bf16_supported, use_onednn
from quantize import fbgemm_available
from resumable import PartWriter, merge_parts, part_path, read_parts, record_keys, write_atomically
from screen import screened_argmax
from tokenizer import n_to_newline

__all__ = ["DecodingOptions", "generate", "load", "summarize", "main"]


# ----------------------------------------------------------------------------- summarization

_LOADED = {}  # load()'s arguments (the hints as the packing they ask for) -> (model, tokenizer): loaded once
_ARGMAX = {}  # id(model) -> greedy's screened argmax (screen.ScreenedArgmax) for the models load() made


def load(name_or_path, dtype="float32", device="cpu", revision=None, original: bool = False, quantize=None,
         batch: int | None = None, num_beams: int | None = None):
    """(model, tokenizer) from a hub id or a checkpoint directory, cached for this process.

    float32 on CPU runs its matmuls through oneDNN (use_onednn) and greedy decoding's argmax through
    screen.ScreenedArgmax, which summarize() passes to generate() for these models. bfloat16 on CPU
    does the same where oneDNN has fast bfloat16 kernels (onednn.bf16_supported: AVX-512 BF16 / AMX);
    elsewhere it runs PyTorch's default (slow) bfloat16 matmuls, with a one-line note. quantize="int8"
    loads int8 weights (quantize.py; fbgemm's kernels, oneDNN's on AMX and for the head with VNNI),
    never building the float model; where fbgemm's kernels cannot run, weight-only int8, with a one-line note.
    original: see load_weights.load_model (the TF positions and "<n>" newlines).

    batch and num_beams: the decoding the caller will run, where it knows it (the CLI: documents per
    generate() call, and the beam width, None for the checkpoint's). With one hypothesis per step
    (greedy, one document at a time) the decoder's matmuls are packed for one row (use_onednn's
    step_rows: ~8% faster greedy on CPU), and an int8 model's kernels are chosen for batch x beams rows
    per step (quantize.quantize_model: oneDNN's from 16 on AMX, the head's from 16 with VNNI); left out,
    the model is packed for any decoding."""
    # The hints change the model only where they mean one hypothesis per step (use_onednn's one-row packing,
    # float path), so the key keeps just that: load(batch=2) and load(batch=8) share one model. batch=1 with the
    # checkpoint's beam width (num_beams None) stays a key of its own: that width is read from the checkpoint.
    if quantize is not None:
        rows = (batch, num_beams)  # int8's kernels follow batch x beams (quantize.quantize_model): keep both
    else:
        rows = "any" if batch != 1 or (num_beams or 0) > 1 else num_beams  # "any", 1 or None
    key = (str(name_or_path), str(dtype), str(device), revision, original, quantize, rows)
    if key not in _LOADED:
        if quantize is not None and torch.device(device).type == "cpu" and not fbgemm_available():
            print("note: fbgemm's int8 kernels do not run in this PyTorch (not an x86 build, or its deprecated "
                  "quantized tensors are gone); int8 runs weight-only here: int8's memory, not its speed",
                  file=sys.stderr)
        # Mapped: use_onednn packs from the page cache, each weight's pages let go as it is replaced; what the
        # heap frees meanwhile (a packed bfloat16 copy, int8 blocks) goes back to the system (the policy below).
        step_rows = None
        if quantize is not None and batch is not None:  # the beam width, if not given, is the checkpoint's
            name_or_path, revision = resolve(str(name_or_path), revision), None  # a directory (downloaded once)
            beams = num_beams or generation_config(name_or_path, read_config(name_or_path)[2]).get("num_beams", 1)
            step_rows = batch * beams
        with returning_freed_memory():
            model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, revision=revision,
                                          original=original, quantize=quantize, step_rows=step_rows)
            if quantize is None:
                if model.dtype == torch.bfloat16 and model.device.type == "cpu" and not bf16_supported():
                    print("note: this CPU has no fast bfloat16 matmuls (oneDNN's bf16 check says no); bfloat16 "
                          "runs slowly here: float32 or --quantize int8 are faster", file=sys.stderr)
                beams = num_beams or model.generation_config.get("num_beams", 1)  # None: the checkpoint's
                step_rows = None if batch is None else batch * beams
                model = use_onednn(model, step_rows)
                _ARGMAX[id(model)] = screened_argmax(model)
        _LOADED[key] = model, tokenizer
    return _LOADED[key]


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar lengths (less padding), shortest first: the batches summarize()
    decodes. Python's sort is stable, so equal lengths keep their input order."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def summarize(texts, model="google/pegasus-xsum", *, batch_size: int = 8, dtype="float32", device="cpu",
              progress: bool = False, stats: dict | None = None, numbers: list[int] | None = None,
              original: bool = False, quantize: str | None = None, **generation_args) -> list[str]:
    """Summaries of a text or a list of texts: what the reference's pipeline("summarization") gives.
    `model` is a hub id, a directory (both loaded once, see load, with the CLI's hints: documents per
    batch and beams) or a (model, tokenizer) pair, used as it is; generation_args go to generate()
    (options=DecodingOptions(...) and/or its keyword overrides). `stats`, if given, receives token
    count and time; `numbers` are what notes call the texts (default 1, 2, ...); quantize="int8"
    loads int8 weights (see load).

    original=True runs the checkpoint as the original PEGASUS code did (README, "Reference or
    original"): the TF position formula, "<n>" newlines (in the text and in the summary) and the
    original beam search (search="original"). A (model, tokenizer) pair must then come from
    load_model(..., original=True)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("empty input: every text to summarize must be a non-empty string")
    if not isinstance(model, tuple):  # loaded for the decoding asked for, as the CLI loads it (see load's hints)
        beams = generation_args.get("num_beams") or generation_args.get("options", DecodingOptions()).num_beams
        model = load(model, dtype, device, original=original, quantize=quantize, batch=min(batch_size, len(texts)),
                     num_beams=beams)
    net, tok = model
    if original:
        if net.config.position_formula != "original" or not tok.newline_to_n:
            raise ValueError("original=True needs a model and tokenizer from load_model(..., original=True)")
        generation_args.setdefault("search", "original")
    generation_args.setdefault("argmax", _ARGMAX.get(id(net)))  # None (the full argmax) for models load() did not make
    limit, eos, device = net.config.max_position_embeddings, net.config.eos_token_id, net.device
    encoded = [tok.encode(t) for t in texts]
    for i, ids in enumerate(encoded):
        if len(ids) > limit:  # the model has no positions beyond its table: keep the start, as the reference does
            number = numbers[i] if numbers else i + 1
            print(f"note: text {number} has {len(ids)} tokens; truncated to the model's {limit}", file=sys.stderr)
            encoded[i] = ids[: limit - 1] + [eos]
    summaries, n_tokens, started = [None] * len(texts), 0, time.perf_counter()
    batches = length_batches([len(ids) for ids in encoded], batch_size)
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


# ----------------------------------------------------------------------------- a corpus: sharded, resumable
# `--file docs.jsonl --output out.jsonl`, in one process or in several started by torchrun (one per
# GPU, on one machine or several). The records are cut into the length-sorted batches ONE process
# would decode (length_batches over all of them), and the batches are dealt out round-robin: each
# process gets short and long ones alike, and every summary is computed in exactly the batch, hence
# with exactly the numbers, of a single-process run. Each decoded batch is appended to the process's
# part file at once (resumable.py); a rerun, with any number of processes, deals out only the
# batches that are not done; process 0 merges the parts into --output in input order at the end.

KILL_AFTER = "GENERATE_KILL_AFTER_BATCHES"  # tests only: SIGKILL this process after writing N batches


def summarize_share(records: list[dict], done: dict, model, writer: PartWriter, *, rank: int = 0, world: int = 1,
                    batch_size: int = 8, progress: bool = False, stats: dict | None = None, **generation_args):
    """Summarize this process's share of the records not in `done`, appending each batch to `writer`."""
    net, tok = model
    limit = net.config.max_position_embeddings
    lengths = [min(len(tok.encode(r["text"])), limit) for r in records]  # as summarize() truncates
    todo = [b for b in length_batches(lengths, batch_size) if any(i not in done for i in b)]
    mine, kill_after = todo[rank::world], int(os.environ.get(KILL_AFTER, 0))
    tokens, seconds, batch_stats = 0, 0.0, {}
    for n, batch in enumerate(tqdm(mine, unit="batch", disable=not progress, file=sys.stderr), start=1):
        summaries = summarize([records[i]["text"] for i in batch], model, batch_size=len(batch), stats=batch_stats,
                              numbers=[i + 1 for i in batch], **generation_args)
        new = [(i, s) for i, s in zip(batch, summaries) if i not in done]  # a torn line's record: its batch again
        writer.write([i for i, _ in new], [s for _, s in new])
        tokens, seconds = tokens + batch_stats["tokens"], seconds + batch_stats["seconds"]
        if n == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash or a preempted machine would: no clean-up at all
    if stats is not None:
        stats.update(tokens=tokens, seconds=seconds)


def run_settings(args) -> dict:
    """The flags that shape a summary: a part file written with others is not resumed from."""
    return {k: v for k, v in vars(args).items() if k not in ("text", "file", "output", "device", "batch_size",
                                                              "verbose")}


# ----------------------------------------------------------------------------- command line
# Every problem with what was asked is found before the model is loaded and gets one line naming the
# flag or file: exit status 2 for a bad request, 1 for a bad checkpoint. The output file is written
# only at the end, atomically, so an error never leaves a partial one.


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_documents(args) -> tuple[list[str], list[dict] | None]:
    """The texts to summarize, and for JSON-lines input the records they came from.

    --file: a .jsonl (or .json) file holds one JSON object with a "text" field per line; any other
    file is ONE document (a .txt article with several paragraphs gives one summary)."""
    if args.text is not None and args.file is not None:
        raise ValueError("give the text as an argument or with --file, not both")
    if args.file is None:
        if args.text is None and sys.stdin.isatty():
            raise ValueError("no input: pass the text as an argument, use --file, or pipe it on standard input")
        if args.text is None:
            text = decode_utf8(sys.stdin.buffer.read(), "standard input")
        else:
            text = args.text
            try:  # undecodable bytes in argv arrive as lone surrogates (PEP 383)
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("the text argument is not valid UTF-8") from None
        if not text.strip():
            raise ValueError("the input text is empty")
        return [text], None
    if args.file.suffix in (".jsonl", ".json"):  # the same reader as train.py's
        try:
            records = read_records(args.file, ("text",))
        except ValueError as e:
            if args.file.suffix == ".json":  # perhaps one JSON document rather than JSON lines
                raise ValueError(f"{e} (a .json --file is read as JSON lines: one object with a 'text' field "
                                 f"per line)") from None
            raise
        return [r["text"] for r in records], records
    if not args.file.is_file():
        raise ValueError(f"cannot read --file {args.file}: {'a directory' if args.file.is_dir() else 'no such file'}")
    try:
        text = decode_utf8(args.file.read_bytes(), f"--file {args.file}")
    except OSError as e:
        raise ValueError(f"cannot read --file {args.file}: {e.strerror or e}") from None
    if not text.strip():
        raise ValueError(f"--file {args.file} contains no text")
    return [text], None


def check_device(device: str, dtype: str):
    """Refuse a device this machine does not have, before anything is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: no Apple MPS GPU is available")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu, cuda and mps are supported")
    if dtype == "float16" and dev.type == "cpu":
        raise ValueError("float16 is not supported on CPU; use --dtype float32 or bfloat16, or a GPU")


def check_output(path: Path | None, reads: tuple[Path | None, ...] = ()):
    """--output must be a file we can create, and not one of the files the run `reads` (the input would
    be overwritten by its own summaries): checked now, not after all the summarizing."""
    if path is None:
        return
    for r in reads:
        if r is not None and (path.resolve() == r.resolve() or (path.exists() and r.exists() and path.samefile(r))):
            raise ValueError(f"--output {path} is the input file {r}; write the summaries to another file")
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"--output {path}: directory {parent} does not exist")
    try:  # create and remove a file there: the only test that also holds for root and read-only mounts
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--output {path}: cannot write in directory {parent} ({e.strerror or e})") from None


def add_model_flags(p: argparse.ArgumentParser):
    """The flags that choose and run the model, shared by generate.py and evaluate.py."""
    add = p.add_argument
    add("--num-beams", metavar="N", type=int, help="beam width (default: the checkpoint's, 8 for the published ones)")
    add("--max-new-tokens", metavar="N", type=int, help="longest summary in tokens (default: the checkpoint's)")
    add("--length-penalty", metavar="X", type=float, help="beam scores are divided by length ** X; X > 0 favours "
                                                          "longer summaries (default: the checkpoint's)")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="weight precision (default: %(default)s; float16 needs a GPU)")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (default: %(default)s)")
    add("--quantize", choices=["int8"], help="int8 weights (CPU: fbgemm or oneDNN int8 kernels; float32 activations): "
                                            "less memory, faster decoding; quality vs float32: README")
    add("--batch-size", metavar="N", type=int, default=8, help="documents decoded together (default: %(default)s)")
    add("--original", action="store_true", help="run the checkpoint as the original PEGASUS code did: its position "
                                                "formula, beam search and '<n>' newlines (default: the reference's)")


def check_model_flags(args):
    """add_model_flags' values: one ValueError naming the flag (exit status 2), before anything is loaded."""
    for flag, value in (("--num-beams", args.num_beams), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1 (got {value})")
    if args.length_penalty is not None and not math.isfinite(args.length_penalty):
        raise ValueError(f"--length-penalty must be a finite number (got {args.length_penalty})")
    check_device(args.device, args.dtype)
    if args.quantize and args.dtype != "float32":
        raise ValueError(f"--quantize {args.quantize} keeps float32 activations; it cannot go with "
                         f"--dtype {args.dtype}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv=None) -> int:
    p = OneLineParser(
        description="Summarize text with PEGASUS. The text comes from the argument, --file, or standard input.",
        epilog="examples:\n"
               '  python generate.py "The city council voted on Tuesday to ..."\n'
               "  cat article.txt | python generate.py --model google/pegasus-cnn_dailymail\n"
               "  python generate.py --file article.txt                # the whole file is one document\n"
               "  python generate.py --file articles.jsonl --output summaries.jsonl --num-beams 4 --verbose",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", help="the document to summarize")
    add = p.add_argument
    add("--model", metavar="NAME", default="google/pegasus-xsum", help="hub id or checkpoint directory (%(default)s)")
    add("--revision", metavar="REV", help="hub branch, tag or commit to load (default: main)")
    add("--file", metavar="PATH", type=Path, help="documents: a .jsonl (or .json) file with one JSON object with a "
                                                   "'text' field per line (written back with a 'summary' field); "
                                                   "any other file (.txt ...) is ONE document")
    add("--output", metavar="PATH", type=Path, help="write the summaries here instead of standard output")
    add_model_flags(p)
    add("--verbose", action="store_true", help="print load time, speed and peak memory to stderr")
    args = p.parse_args(argv)
    try:  # problems with what was asked: exit status 2
        check_model_flags(args)
        if args.revision is not None and (not args.revision.strip() or Path(args.model).expanduser().exists()):
            raise ValueError(f"--revision {args.revision!r} needs a hub id as --model, not a local directory"
                             if args.revision.strip() else "--revision is empty")
        check_output(args.output, reads=(args.file,))
        texts, records = read_documents(args)
        corpus = records is not None and args.output is not None  # resumable; shared out under torchrun
        if "RANK" in os.environ and not corpus:
            raise ValueError("under torchrun, give a .jsonl --file and an --output: the processes share its records")
        if "RANK" in os.environ and args.device.startswith("cuda"):  # each process takes GPU number LOCAL_RANK
            local, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local >= gpus:
                raise ValueError(f"--device {args.device} under torchrun: process {local} of this machine needs "
                                 f"GPU {local} and there are {gpus}; use --nproc_per_node {gpus} or fewer")
        if corpus:
            keys = record_keys(records, run_settings(args))
            done = read_parts(args.output, keys)  # parts of another run are refused now, before loading
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world = 0, 1
    if corpus and "RANK" in os.environ:  # started by torchrun
        rank, _, world, args.device = setup_distributed(args.device)  # cuda -> cuda:LOCAL_RANK
        dist.barrier()  # every process has read the parts before any process appends to them
    if corpus and done and rank == 0:
        print(f"resuming: {len(done)} of {len(records)} records are already summarized in "
              f"{part_path(args.output, '*')}", file=sys.stderr)
    try:  # problems with the model: exit status 1
        started, stats = time.perf_counter(), {}
        model = load(args.model, args.dtype, args.device, args.revision, original=args.original, quantize=args.quantize,
                     batch=min(args.batch_size, len(records if corpus else texts)), num_beams=args.num_beams)
        loaded = time.perf_counter() - started
        limit = model[0].config.max_position_embeddings  # known only now, from the checkpoint's config
        if args.max_new_tokens is not None and args.max_new_tokens > limit:
            print(f"error: --max-new-tokens {args.max_new_tokens} is more than {args.model} can write "
                  f"(its {limit} positions)", file=sys.stderr)
            return 2
        if corpus:
            writer = PartWriter(args.output, rank, keys)
            summarize_share(records, done, model, writer, rank=rank, world=world, batch_size=args.batch_size,
                            stats=stats, progress=rank == 0 and len(records) - len(done) > args.batch_size,
                            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                            length_penalty=args.length_penalty, original=args.original)
            writer.close()
        else:
            summaries = summarize(texts, model, batch_size=args.batch_size, stats=stats,
                                  progress=len(texts) > args.batch_size, num_beams=args.num_beams,
                                  max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                                  original=args.original)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return 1
    # "<n>" shown as a line break, in every mode: the reference's pegasus-cnn_dailymail writes it
    # literally between sentences (in JSON lines, a real newline in the string: "\n").
    if not corpus:
        summaries = [n_to_newline(s) for s in summaries]
    if records is not None and not corpus:
        summaries = [json.dumps(r | {"summary": s}, ensure_ascii=False) for r, s in zip(records, summaries)]
    if corpus:
        if dist.is_initialized():
            dist.barrier()  # every process's part is complete
        if rank == 0:
            try:
                merge_parts(args.output, keys,
                            lambda i, s: json.dumps(records[i] | {"summary": n_to_newline(s)}, ensure_ascii=False))
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            except OSError as e:
                print(f"error: cannot write --output {args.output}: {e.strerror or e}", file=sys.stderr)
                return 2
        if dist.is_initialized():
            dist.destroy_process_group()
    elif args.output is not None:
        try:
            write_atomically(args.output, "".join(line + "\n" for line in summaries))
        except OSError as e:
            print(f"error: cannot write --output {args.output}: {e.strerror or e}", file=sys.stderr)
            return 2
    else:
        print("\n".join(summaries))
    if args.verbose:
        peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
        print(f"loaded {args.model} in {loaded:.1f} s; {stats['tokens']} summary tokens in {stats['seconds']:.1f} s "
              f"({stats['tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s); peak memory {peak / 2**30:.2f} GiB",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback; --output was not touched (written only at the end)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
