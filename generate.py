"""Decoding for PEGASUS (greedy, sampling, beam search over a KV cache) and a summarization CLI:
`python generate.py "some article"` prints its summary (see --help).

The encoder reads the document once. The decoder then runs one step at a time: feed the newest
token of every hypothesis, get the next-token logits, let a search rule choose how each hypothesis
goes on (`Sampler`: greedy or sampling; `BeamSearch`), repeat. Two caches keep a step cheap
(pegasus.DecoderCache): cross-attention keys/values, computed once per document and shared by all
of its beams, and a preallocated self-attention cache that each step writes at its position.

Every rule reproduces transformers' `generate()` (v5, generation/utils.py and logits_process.py)
token for token, including two of its quirks, which are pointed out where they happen.
"""

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import read_records
from onednn import use_onednn

NEG = -1e9  # "ruled out" in beam bookkeeping; finite, as in the reference, so that sums stay ordered


@dataclass
class Settings:
    max_new_tokens: int  # tokens after the decoder start token, EOS included
    min_new_tokens: int  # EOS is blocked until this many tokens have been generated
    num_beams: int
    length_penalty: float  # beam scores are sum(log p) / norm(length), norm = length ** length_penalty
    length_norm: str  # "reference" (length ** alpha) or "gnmt" (((5 + length) / 6) ** alpha)
    early_stopping: bool | str  # True, False or "never"; see BeamSearch.update_open
    num_return_sequences: int
    no_repeat_ngram_size: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: int
    pad: int
    start: int
    forced_eos: int | None  # forced as the last token when the length limit is reached


def constrain(scores: torch.Tensor, seqs: torch.Tensor, t: int, s: Settings) -> torch.Tensor:
    """The reference's logits processors, in its order, applied in place to scores (N, V) for the
    token after seqs[:, :t+1] (the start token plus t generated tokens)."""
    n = s.no_repeat_ngram_size
    if n and t + 1 >= n:
        # Ban every token that would repeat an n-gram: find the earlier n-grams whose first n-1
        # tokens equal the last n-1 tokens, and ban what followed them.
        grams = seqs[:, : t + 1].unfold(1, n, 1)  # (N, W, n): every n-gram so far
        hit = (grams[:, :, :-1] == seqs[:, None, t + 2 - n: t + 1]).all(-1)  # (N, W)
        rows, cols = hit.nonzero(as_tuple=True)
        scores[rows, grams[rows, cols, -1]] = -float("inf")
    if t < s.min_new_tokens:
        scores[:, s.eos] = -float("inf")
    if s.forced_eos is not None and t == s.max_new_tokens - 1:
        scores.fill_(-float("inf"))
        scores[:, s.forced_eos] = 0.0
    return scores


class Sampler:
    """Greedy decoding (argmax), or sampling from the temperature / top-k / top-p filtered
    distribution; num_return_sequences independent samples per document."""

    def __init__(self, s: Settings, batch: int, device, seed: int | None):
        self.s, self.width, self.fill = s, s.num_return_sequences, s.pad
        self.generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        self.done = torch.zeros(batch * self.width, dtype=torch.bool, device=device)

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        s = self.s
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k > 0:  # keep the k most likely tokens
            kth = scores.topk(min(s.top_k, scores.size(-1))).values[:, -1:]  # (N, 1)
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if s.top_p < 1.0:  # keep the smallest set of most likely tokens whose probability reaches top_p
            ascending, order = scores.sort(dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - s.top_p  # (N, V), in sorted order
            drop[:, -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        return scores

    def step(self, model, h: torch.Tensor, seqs: torch.Tensor, t: int, cache) -> bool:
        fix = lambda scores: constrain(scores, seqs, t, self.s)
        if self.s.do_sample:
            probs = self.warp(fix(model.logits(h).float())).softmax(-1)
            token = torch.multinomial(probs, 1, generator=self.generator)[:, 0]  # (N,)
        elif hasattr(model, "greedy_argmax"):  # onednn.use_onednn's exact argmax that skips most of the head
            token = model.greedy_argmax(h, fix)
        else:
            token = fix(model.logits(h).float()).argmax(-1)  # (N,)
        seqs[:, t + 1] = token.masked_fill(self.done, self.s.pad)  # finished texts are padded
        self.done |= token == self.s.eos
        return bool(self.done.all())

    def result(self, seqs: torch.Tensor, t: int) -> torch.Tensor:
        return seqs[:, : t + 2]


class BeamSearch:
    """Beam search as the reference does it (transformers v5 `_beam_search`).

    Each document keeps num_beams running hypotheses and num_beams finished ones. At every step
    the 2*num_beams best continuations over all running beams are ranked by summed log-probability;
    those that end (EOS, or the length limit) and rank within the first num_beams become finished
    candidates with score sum(log p) / norm(length), the others refill the running beams.

    Length normalisation: the reference divides by length ** alpha (length = generated tokens,
    EOS included). The original PEGASUS code (pegasus/layers/beam_search.py, after Wu et al. 2016,
    GNMT) divides by ((5 + length) / 6) ** alpha: one more token changes the norm by a factor
    1 + alpha / (5 + length) instead of 1 + alpha / length, so it rewards length less, most of all
    in short outputs. length_norm="gnmt" runs the same search with that formula: the published
    ROUGE scores came from it, transformers' outputs from the other.
    """

    def __init__(self, s: Settings, batch: int, device):
        K, L = s.num_beams, 1 + s.max_new_tokens
        self.s, self.B, self.width = s, batch, K
        # Quirk: the reference fills finished texts with `pad_token_id or eos_token_id`, and PEGASUS's
        # pad id is 0, so beam search pads with EOS (1), while greedy decoding pads with 0.
        self.fill = s.pad or s.eos
        self.scores = torch.zeros(batch, K, device=device)  # (B, K) running sum of log-probs
        self.scores[:, 1:] = NEG  # all beams start identical: only the first one may expand at step 0
        self.fin_seqs = torch.full((batch, K, L), self.fill, dtype=torch.long, device=device)
        self.fin_scores = torch.full((batch, K), NEG, device=device)  # (B, K) best first
        self.fin_len = torch.zeros(batch, K, dtype=torch.long, device=device)
        self.fin_real = torch.zeros(batch, K, dtype=torch.bool, device=device)  # slot holds a finished text
        self.open = torch.ones(batch, 1, dtype=torch.bool, device=device)  # can a document still improve?
        self.first_row = torch.arange(batch, device=device)[:, None] * K  # (B, 1) its first hypothesis
        self.in_top = torch.arange(2 * K, device=device) < K  # (2K,) the K best candidates

    def norm(self, length: int) -> float:
        if self.s.length_norm == "gnmt":
            return ((5 + length) / 6) ** self.s.length_penalty
        return length ** self.s.length_penalty

    def step(self, model, h: torch.Tensor, seqs: torch.Tensor, t: int, cache) -> bool:
        s, B, K = self.s, self.B, self.width
        logprobs = constrain(F.log_softmax(model.logits(h).float(), dim=-1), seqs, t, s)  # (B*K, V)
        V = logprobs.size(-1)
        total = (logprobs.view(B, K, V) + self.scores[:, :, None]).view(B, K * V)  # (B, K*V)
        # 2K candidates: even if K of them end here, K remain to carry on.
        top, idx = total.topk(2 * K)  # (B, 2K), best first
        parent = self.first_row + idx // V  # (B, 2K): the hypothesis (row of seqs) each one extends
        cand = seqs[parent]  # (B, 2K, L)
        cand[:, :, t + 1] = idx % V
        ended = (cand[:, :, t + 1] == s.eos) | (t + 1 == s.max_new_tokens)  # (B, 2K)
        self.add_finished(cand, top, ended, t)
        alive = top + ended * NEG  # the K best candidates that did not end run on
        self.scores, keep = alive.topk(K)  # (B, K)
        seqs.copy_(cand.gather(1, keep[:, :, None].expand(-1, -1, cand.size(2))).flatten(0, 1))  # (B*K, L)
        if cache is not None:
            cache.reorder(parent.gather(1, keep).flatten())  # new hypothesis i continues old parent[i]
        self.update_open(t)
        return not self.open.any() or (s.early_stopping is True and self.fin_real.all()) or bool(ended.all())

    def add_finished(self, cand, top, ended, t: int):
        """Merge this step's ended candidates into each document's K best finished texts."""
        score = top / self.norm(t + 1)  # (B, 2K)
        if self.s.early_stopping is True:  # once K texts are finished, accept no more
            score = score + self.fin_real.all(-1, keepdim=True) * NEG
        score = score + ~self.open * NEG
        new = ended & self.in_top  # only candidates ranked in the first K may finish
        score = score + ~new * NEG
        self.fin_scores, best = torch.cat([self.fin_scores, score], 1).topk(self.width)  # (B, K) of 3K
        pick = lambda old, new_: torch.cat([old, new_], 1).gather(1, best)
        self.fin_len = pick(self.fin_len, torch.full_like(top, t + 1, dtype=torch.long))
        self.fin_real = pick(self.fin_real, new)
        L = cand.size(2)
        self.fin_seqs = torch.cat([self.fin_seqs, cand], 1).gather(1, best[:, :, None].expand(-1, -1, L))  # (B, K, L)

    def update_open(self, t: int):
        """A document stops improving when even its best running beam, scored as if it ended now,
        cannot beat its worst finished text. Quirk: with early_stopping=False the reference uses
        this as is, which is a true bound only when length_penalty <= 0 (with a positive penalty a
        longer text may still win); "never" with a positive penalty scores the best beam as if it
        ended at the length limit, a true bound."""
        s = self.s
        length = s.max_new_tokens if (s.early_stopping == "never" and s.length_penalty > 0) else t + 1
        best = self.scores[:, :1] / self.norm(length)  # (B, 1)
        worst = torch.where(self.fin_real, self.fin_scores.min(1, keepdim=True).values, NEG)  # (B, K)
        self.open &= (best > worst).any(-1, keepdim=True)

    def result(self, seqs: torch.Tensor, t: int) -> torch.Tensor:
        R = self.s.num_return_sequences
        longest = int(self.fin_len[:, :R].max())
        return self.fin_seqs[:, :R].flatten(0, 1)[:, : 1 + longest]  # (B*R, 1+T)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int | None = None, min_new_tokens: int | None = None, num_beams: int | None = None,
             length_penalty: float | None = None, early_stopping: bool | str | None = None,
             num_return_sequences: int = 1, no_repeat_ngram_size: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             length_norm: str = "reference", use_cache: bool = True) -> torch.Tensor:
    """Token ids (B, S) -> (B * num_return_sequences, 1 + T) ids that start with the decoder start
    token, as transformers' generate() returns them. Settings left at None come from the
    checkpoint (model.generation_config), else the reference's defaults. The reference's
    max_length / min_length count the start token: max_new_tokens = max_length - 1."""
    gc, cfg = model.generation_config, model.config
    pick = lambda value, key, default: gc.get(key, default) if value is None else value
    s = Settings(max_new_tokens=pick(max_new_tokens, "max_new_tokens", gc.get("max_length", 20) - 1),
                 min_new_tokens=pick(min_new_tokens, "min_new_tokens", max(gc.get("min_length", 0) - 1, 0)),
                 num_beams=pick(num_beams, "num_beams", 1), length_penalty=pick(length_penalty, "length_penalty", 1.0),
                 length_norm=length_norm, early_stopping=pick(early_stopping, "early_stopping", False),
                 num_return_sequences=num_return_sequences,
                 no_repeat_ngram_size=pick(no_repeat_ngram_size, "no_repeat_ngram_size", 0), do_sample=do_sample,
                 temperature=temperature, top_k=top_k, top_p=top_p, eos=cfg.eos_token_id, pad=cfg.pad_token_id,
                 start=cfg.decoder_start_token_id, forced_eos=gc.get("forced_eos_token_id", cfg.forced_eos_token_id))
    check(s, input_ids, attention_mask, cfg.max_position_embeddings)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: attention runs a faster kernel without a mask (as the reference's does)
    B, device = input_ids.size(0), input_ids.device
    search = BeamSearch(s, B, device) if s.num_beams > 1 else Sampler(s, B, device, seed)
    n = B * search.width  # hypotheses; rows i*width .. (i+1)*width-1 belong to document i
    encoder_out = model.encode(input_ids, attention_mask)  # (B, S, D), once per document
    cache = model.new_cache(encoder_out, attention_mask, n, s.max_new_tokens) if use_cache else None
    seqs = input_ids.new_full((n, 1 + s.max_new_tokens), search.fill)  # (n, 1+T)
    seqs[:, 0] = s.start
    positions = torch.arange(s.max_new_tokens, device=device)
    for t in range(s.max_new_tokens):
        if cache is not None:  # feed only the newest token; the cache holds the rest
            h = model.decode(seqs[:, t: t + 1], cache=cache, input_pos=positions[t: t + 1], hidden=True)  # (n, 1, D)
        else:  # the slow, obviously correct way: re-run the whole prefix
            h = model.decode(seqs[:, : t + 1], encoder_out, attention_mask, hidden=True)  # (n, t+1, D)
        if search.step(model, h[:, -1], seqs, t, cache):  # the search scores the newest position
            break
    return search.result(seqs, t)


def check(s: Settings, input_ids, attention_mask, n_positions: int):
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a 2-D LongTensor, got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} differ")
    if not 1 <= s.max_new_tokens <= n_positions:
        raise ValueError(f"max_new_tokens must be in 1..{n_positions} (the model's positions), got {s.max_new_tokens}")
    if s.num_beams < 1 or not 1 <= s.num_return_sequences <= (s.num_beams if not s.do_sample else 10**6):
        raise ValueError(f"num_return_sequences={s.num_return_sequences} needs 1 <= it <= num_beams={s.num_beams} "
                         f"(or do_sample=True)")
    if s.do_sample and (s.num_beams > 1 or not (s.temperature > 0 and 0 < s.top_p <= 1 and s.top_k >= 0)):
        raise ValueError("sampling needs num_beams=1 (no beam sampling), temperature > 0, 0 < top_p <= 1, top_k >= 0")
    if s.early_stopping not in (True, False, "never") or s.length_norm not in ("reference", "gnmt"):
        raise ValueError(f"early_stopping must be True, False or 'never' (got {s.early_stopping!r}), length_norm "
                         f"'reference' or 'gnmt' (got {s.length_norm!r})")


# ----------------------------------------------------------------------------- summarization

_LOADED = {}  # (name, dtype, device) -> (model, tokenizer): summarize() loads each checkpoint once


def load(name_or_path, dtype="float32", device="cpu", revision=None):
    """(model, tokenizer) from a hub id or a checkpoint directory, cached for this process; float32
    on CPU runs its matmuls through oneDNN (use_onednn)."""
    from load_weights import load_model

    key = (str(name_or_path), str(dtype), str(device), revision)
    if key not in _LOADED:
        # Not memory-mapped: use_onednn then frees each original weight as it converts it.
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, mmap=False, revision=revision)
        _LOADED[key] = use_onednn(model), tokenizer
    return _LOADED[key]


def summarize(texts, model="google/pegasus-xsum", *, batch_size: int = 8, dtype="float32", device="cpu",
              progress: bool = False, stats: dict | None = None, **generation_args) -> list[str]:
    """Summaries of a text or a list of texts: what the reference's pipeline("summarization") gives.
    `model` is a hub id, a directory (both loaded once, see load) or a (model, tokenizer) pair, used
    as it is; generation_args go to generate(). `stats`, if given, receives token count and time."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("empty input: every text to summarize must be a non-empty string")
    net, tok = model if isinstance(model, tuple) else load(model, dtype, device)
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


def check_output(path: Path | None):
    """--output must be a file we can create: checked now, not after all the summarizing."""
    if path is None:
        return
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


def write_atomically(path: Path, text: str):
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
        for flag, value in (("--num-beams", args.num_beams), ("--max-new-tokens", args.max_new_tokens),
                            ("--batch-size", args.batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1 (got {value})")
        if args.length_penalty is not None and not math.isfinite(args.length_penalty):
            raise ValueError(f"--length-penalty must be a finite number (got {args.length_penalty})")
        if args.revision is not None and (not args.revision.strip() or Path(args.model).expanduser().exists()):
            raise ValueError(f"--revision {args.revision!r} needs a hub id as --model, not a local directory"
                             if args.revision.strip() else "--revision is empty")
        check_device(args.device, args.dtype)
        check_output(args.output)
        texts, records = read_documents(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # problems with the model: exit status 1
        started, stats = time.perf_counter(), {}
        model = load(args.model, args.dtype, args.device, args.revision)
        loaded = time.perf_counter() - started
        limit = model[0].config.max_position_embeddings  # known only now, from the checkpoint's config
        if args.max_new_tokens is not None and args.max_new_tokens > limit:
            print(f"error: --max-new-tokens {args.max_new_tokens} is more than {args.model} can write "
                  f"(its {limit} positions)", file=sys.stderr)
            return 2
        summaries = summarize(texts, model, batch_size=args.batch_size, stats=stats,
                              progress=len(texts) > args.batch_size, num_beams=args.num_beams,
                              max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty)
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if records is not None:
        summaries = [json.dumps(r | {"summary": s}, ensure_ascii=False) for r, s in zip(records, summaries)]
    if args.output is not None:
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
              f"({stats['tokens'] / stats['seconds']:.1f} tokens/s); peak memory {peak / 2**30:.2f} GiB",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: no traceback; --output was not touched (written only at the end)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
