"""Decoding for PEGASUS: greedy, sampling and beam search over a KV cache, as small functions over
one step loop (the shape of Whisper's decoding.py). generate.py is the application built on it.

The encoder reads the document once. The decoder then runs one step at a time: feed the newest
token of every hypothesis, get the next-token logits, let a search rule choose how each hypothesis
goes on (`Sampler`: greedy or sampling; `BeamSearch`), repeat. Two caches keep a step cheap
(pegasus.DecoderCache): cross-attention keys/values, computed once per document and shared by all
of its beams, and a preallocated self-attention cache that each step writes at its position.

Every option lives in one frozen `DecodingOptions`; change one with dataclasses.replace(options,
num_beams=4). Every rule reproduces transformers' `generate()` (v5, generation/utils.py and
logits_process.py) token for token, including two of its quirks, pointed out where they happen.

A search rule is a small class with `width` (hypotheses per document), `fill` (the padding id of
finished texts), `step(model, h, seqs, t) -> (finished, parents)` and `result(seqs, t)`; the step
loop in `generate` knows nothing else about it: the original PEGASUS beam search
(`OriginalBeamSearch`, search="original") is one more class and one more line in `search_rule`.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pegasus import right_padded_lengths

NEG = -1e9  # "ruled out" in beam bookkeeping; finite, as in the reference, so that sums stay ordered


@dataclass(frozen=True)
class DecodingOptions:
    """Everything that decides which tokens come out. None means "the checkpoint's value"
    (model.generation_config), else the reference's default, which is given in the comment."""

    max_new_tokens: int | None = None  # tokens after the decoder start token, EOS included (ref: max_length 20 - 1)
    min_new_tokens: int | None = None  # EOS is blocked until this many tokens exist (ref: min_length - 1, 0)
    num_beams: int | None = None  # 1: greedy or sampling; more: beam search (ref: 1)
    length_penalty: float | None = None  # beam scores are sum(log p) / norm(length), norm = length ** this (ref: 1.0)
    early_stopping: bool | str | None = None  # True, False or "never"; see BeamSearch.update_open (ref: False)
    no_repeat_ngram_size: int | None = None  # ban any n-gram of this size from appearing twice (ref: 0, off)
    num_return_sequences: int = 1  # texts per document (the best ones of a beam search, or independent samples)
    do_sample: bool = False  # sample from the filtered distribution instead of taking the argmax
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int = 0  # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: keep the smallest most likely set whose probability reaches top_p
    seed: int | None = None  # sampling: seed of a private generator (None: torch's global one)
    length_norm: str = "reference"  # "reference" (length ** alpha) or "gnmt" (((5 + length) / 6) ** alpha)
    # "reference": transformers' rules (Sampler, BeamSearch); "original": the PEGASUS TF code's
    # (OriginalBeamSearch; greedy without the reference's logits processors when num_beams is 1).
    search: str = "reference"
    use_cache: bool = True  # False re-runs the whole prefix every step (slow, obviously correct)
    # Greedy's argmax over the vocabulary, h (N, D) and constrain -> ids (N,). None: the argmax of the
    # full logits. screen.ScreenedArgmax gives the same ids reading a quarter of the output matrix.
    argmax: Callable | None = None


@dataclass(frozen=True)
class Tokens:
    """The special ids decoding needs, from the model's config and generation_config."""
    eos: int
    pad: int
    start: int
    forced_eos: int | None  # forced as the last token when the length limit is reached


def resolve(options: DecodingOptions, model) -> tuple[DecodingOptions, Tokens]:
    """Options with every None replaced by the checkpoint's value or the reference's default, and the special ids."""
    gc, cfg = model.generation_config, model.config
    if options.search == "original":
        # The original has no n-gram ban, and its minimum length (beam_min) is 0 in every published
        # config (pegasus/params/public_params.py:59): the checkpoint's min_length is the reference's.
        options = replace(options, min_new_tokens=options.min_new_tokens or 0,
                          no_repeat_ngram_size=options.no_repeat_ngram_size or 0)
    checkpoint = dict(max_new_tokens=gc.get("max_new_tokens", gc.get("max_length", 20) - 1),
                      min_new_tokens=gc.get("min_new_tokens", max(gc.get("min_length", 0) - 1, 0)),
                      num_beams=gc.get("num_beams", 1), length_penalty=gc.get("length_penalty", 1.0),
                      early_stopping=gc.get("early_stopping", False),
                      no_repeat_ngram_size=gc.get("no_repeat_ngram_size", 0))
    options = replace(options, **{k: v for k, v in checkpoint.items() if getattr(options, k) is None})
    tokens = Tokens(eos=cfg.eos_token_id, pad=cfg.pad_token_id, start=cfg.decoder_start_token_id,
                    forced_eos=gc.get("forced_eos_token_id", cfg.forced_eos_token_id))
    return options, tokens


def check(o: DecodingOptions, input_ids, attention_mask, n_positions: int):
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a 2-D LongTensor, got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} differ")
    if not 1 <= o.max_new_tokens <= n_positions:
        raise ValueError(f"max_new_tokens must be in 1..{n_positions} (the model's positions), got {o.max_new_tokens}")
    if o.num_beams < 1 or not 1 <= o.num_return_sequences <= (o.num_beams if not o.do_sample else 10**6):
        raise ValueError(f"num_return_sequences={o.num_return_sequences} needs 1 <= it <= num_beams={o.num_beams} "
                         f"(or do_sample=True)")
    if o.do_sample and (o.num_beams > 1 or not (o.temperature > 0 and 0 < o.top_p <= 1 and o.top_k >= 0)):
        raise ValueError("sampling needs num_beams=1 (no beam sampling), temperature > 0, 0 < top_p <= 1, top_k >= 0")
    if o.early_stopping not in (True, False, "never") or o.length_norm not in ("reference", "gnmt"):
        raise ValueError(f"early_stopping must be True, False or 'never' (got {o.early_stopping!r}), length_norm "
                         f"'reference' or 'gnmt' (got {o.length_norm!r})")
    if o.search not in ("reference", "original"):
        raise ValueError(f"search must be 'reference' or 'original', got {o.search!r}")
    if o.search == "original" and (o.do_sample or o.no_repeat_ngram_size or (o.num_beams == 1 and o.min_new_tokens)):
        raise ValueError("search='original' has no sampling, no n-gram ban, and (with num_beams=1, plain greedy) "
                         "no minimum length; use search='reference' for those")


# ----------------------------------------------------------------------------- logits processors


def constrain(scores: torch.Tensor, seqs: torch.Tensor, t: int, o: DecodingOptions, tok: Tokens) -> torch.Tensor:
    """The reference's logits processors, in its order, applied in place to scores (N, V) for the
    token after seqs[:, :t+1] (the start token plus t generated tokens)."""
    n = o.no_repeat_ngram_size
    if n and t + 1 >= n:
        # Ban every token that would repeat an n-gram: find the earlier n-grams whose first n-1
        # tokens equal the last n-1 tokens, and ban what followed them.
        grams = seqs[:, : t + 1].unfold(1, n, 1)  # (N, W, n): every n-gram so far
        hit = (grams[:, :, :-1] == seqs[:, None, t + 2 - n: t + 1]).all(-1)  # (N, W)
        rows, cols = hit.nonzero(as_tuple=True)
        scores[rows, grams[rows, cols, -1]] = -float("inf")
    if t < o.min_new_tokens:
        scores[:, tok.eos] = -float("inf")
    if tok.forced_eos is not None and t == o.max_new_tokens - 1:
        scores.fill_(-float("inf"))
        scores[:, tok.forced_eos] = 0.0
    return scores


def log_softmax_(scores: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, written over `scores` (N, V), fresh logits the caller owns: the
    same kernel as F.log_softmax, so the same values, without a second (N, V) tensor. For beam 8 over 4
    documents that is 12 MB less at every step (the search's peak) and no fresh 12 MB to fault in."""
    return torch.log_softmax(scores, dim=-1, out=scores)


def warp(scores: torch.Tensor, o: DecodingOptions) -> torch.Tensor:
    """Sampling's filters: temperature, then top-k, then top-p (the reference's order)."""
    if o.temperature != 1.0:
        scores = scores / o.temperature
    if o.top_k > 0:  # keep the k most likely tokens
        kth = scores.topk(min(o.top_k, scores.size(-1))).values[:, -1:]  # (N, 1)
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if o.top_p < 1.0:  # keep the smallest set of most likely tokens whose probability reaches top_p
        ascending, order = scores.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - o.top_p  # (N, V), in sorted order
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


# ----------------------------------------------------------------------------- search rules


class Sampler:
    """Greedy decoding (argmax), or sampling from the temperature / top-k / top-p filtered
    distribution; num_return_sequences independent samples per document."""

    def __init__(self, o: DecodingOptions, tok: Tokens, batch: int, device):
        self.o, self.tok, self.width, self.fill = o, tok, o.num_return_sequences, tok.pad
        self.generator = None if o.seed is None else torch.Generator(device).manual_seed(o.seed)
        self.done = torch.zeros(batch * self.width, dtype=torch.bool, device=device)

    def step(self, model, h: torch.Tensor, seqs: torch.Tensor, t: int) -> tuple[bool, None]:
        fix = lambda scores: constrain(scores, seqs, t, self.o, self.tok)  # noqa: E731
        if self.o.do_sample:
            probs = warp(fix(model.logits(h).float()), self.o).softmax(-1)
            token = torch.multinomial(probs, 1, generator=self.generator)[:, 0]  # (N,)
        elif self.o.argmax is not None:  # e.g. screen.ScreenedArgmax: the same ids, most of the head unread
            token = self.o.argmax(h, fix)
        else:
            token = fix(model.logits(h).float()).argmax(-1)  # (N,)
        seqs[:, t + 1] = token.masked_fill(self.done, self.tok.pad)  # finished texts are padded
        self.done |= token == self.tok.eos
        return bool(self.done.all()), None  # hypotheses never swap places

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
    in short outputs. length_norm="gnmt" runs this (the reference's) search with that formula and
    nothing else of the original: a hybrid, kept because it is a cheap, documented knob. The search
    the published ROUGE scores came from differs in more than the formula: OriginalBeamSearch.
    """

    def __init__(self, o: DecodingOptions, tok: Tokens, batch: int, device):
        K, L = o.num_beams, 1 + o.max_new_tokens
        self.o, self.tok, self.B, self.width = o, tok, batch, K
        # Quirk: the reference fills finished texts with `pad_token_id or eos_token_id`, and PEGASUS's
        # pad id is 0, so beam search pads with EOS (1), while greedy decoding pads with 0.
        self.fill = tok.pad or tok.eos
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
        if self.o.length_norm == "gnmt":
            return ((5 + length) / 6) ** self.o.length_penalty
        return length ** self.o.length_penalty

    def step(self, model, h: torch.Tensor, seqs: torch.Tensor, t: int) -> tuple[bool, torch.Tensor]:
        o, B, K = self.o, self.B, self.width
        logprobs = constrain(log_softmax_(model.logits(h).float()), seqs, t, o, self.tok)  # (B*K, V)
        # 2K candidates: even if K of them end here, K remain to carry on. The reference ranks all K*V
        # continuations of a document at once; adding a beam's score keeps the order of its own
        # tokens, so the best 2K overall are among each beam's best 2K: rank those K*2K instead
        # (the same values; at pegasus-xsum's beam 8 the reference's topk reads 770k per document).
        n = min(2 * K, logprobs.size(-1))  # a vocabulary smaller than 2K: all of it
        best, token = logprobs.topk(n)  # (B*K, n) each beam's best
        total = (best.view(B, K, n) + self.scores[:, :, None]).view(B, K * n)  # (B, K*n)
        top, pick = total.topk(2 * K)  # (B, 2K), best first
        parent = self.first_row + pick // n  # (B, 2K): the hypothesis (row of seqs) each one extends
        cand = seqs[parent]  # (B, 2K, L)
        cand[:, :, t + 1] = token.view(B, K * n).gather(1, pick)
        ended = (cand[:, :, t + 1] == self.tok.eos) | (t + 1 == o.max_new_tokens)  # (B, 2K)
        self.add_finished(cand, top, ended, t)
        alive = top + ended * NEG  # the K best candidates that did not end run on
        self.scores, keep = alive.topk(K)  # (B, K)
        seqs.copy_(cand.gather(1, keep[:, :, None].expand(-1, -1, cand.size(2))).flatten(0, 1))  # (B*K, L)
        self.update_open(t)
        finished = not self.open.any() or (o.early_stopping is True and self.fin_real.all()) or bool(ended.all())
        return finished, parent.gather(1, keep).flatten()  # new hypothesis i continues old parents[i]

    def add_finished(self, cand, top, ended, t: int):
        """Merge this step's ended candidates into each document's K best finished texts."""
        score = top / self.norm(t + 1)  # (B, 2K)
        if self.o.early_stopping is True:  # once K texts are finished, accept no more
            score = score + self.fin_real.all(-1, keepdim=True) * NEG
        score = score + ~self.open * NEG
        new = ended & self.in_top  # only candidates ranked in the first K may finish
        score = score + ~new * NEG
        self.fin_scores, best = torch.cat([self.fin_scores, score], 1).topk(self.width)  # (B, K) of 3K
        pick = lambda old, new_: torch.cat([old, new_], 1).gather(1, best)  # noqa: E731
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
        o = self.o
        length = o.max_new_tokens if (o.early_stopping == "never" and o.length_penalty > 0) else t + 1
        best = self.scores[:, :1] / self.norm(length)  # (B, 1)
        worst = torch.where(self.fin_real, self.fin_scores.min(1, keepdim=True).values, NEG)  # (B, K)
        self.open &= (best > worst).any(-1, keepdim=True)

    def result(self, seqs: torch.Tensor, t: int) -> torch.Tensor:
        R = self.o.num_return_sequences
        longest = int(self.fin_len[:, :R].max())
        return self.fin_seqs[:, :R].flatten(0, 1)[:, : 1 + longest]  # (B*R, 1+T)


def original_score(logprob: torch.Tensor, length: int, alpha: float, beam_min: int = 0, beam_max: int = -1,
                   start: int = 5, out_of_range: float = -1e3) -> torch.Tensor:
    """The original's score of a finished text of `length` tokens (EOS included) with summed
    log-probability `logprob`: GNMT's length normalisation plus a constant penalty for a length
    outside [beam_min, beam_max] (pegasus/layers/beam_search.py:59-69; start 5 and the -1e3 penalty
    are fixed in pegasus/layers/decoding.py:100 and :167). beam_max <= 0 means no upper limit;
    every published config has beam_min 0 and beam_max -1 (pegasus/params/public_params.py:59-60)."""
    score = logprob / ((start + length) / (1 + start)) ** alpha
    too_long = beam_max > 0 and length > beam_max
    return score + out_of_range * (length < beam_min or too_long)


class OriginalBeamSearch:
    """Beam search as the original PEGASUS code ran it (pegasus/layers/beam_search.py, called by
    pegasus/layers/decoding.py:159-172; in the style of tensor2tensor's). Line numbers below are
    those of google-research/pegasus at commit 1b49290.

    The step is the reference's: grow the 2K best continuations of the K running ("alive") beams by
    summed log-probability, the K best of those that did not end run on. The rest differs:

                       reference (BeamSearch)                   original (this class)
      finished from    ended candidates ranked in the first K   every ended one of the 2K (l. 133-141)
      finished score   sum(log p) / len ** alpha                sum(log p) / ((5 + len) / 6) ** alpha
                                                                  - 1000 if len < beam_min (l. 59-69)
      minimum length   EOS blocked before min_new_tokens        the -1000 above, EOS never blocked
      stops            when no beam can still win, or all end   never: max_new_tokens steps (l. 161)
      length limit     the last step ends every beam (forced    none: an alive beam may be returned,
                       EOS where the config has one)              unfinished (l. 173-181)
      result           the best finished texts                  per slot i: the i-th best finished
                                                                  text if it holds EOS, else the
                                                                  i-th alive beam (l. 173-181)

    len counts the generated tokens, EOS included (length_norm_fn(..., i + 1) at step i, l. 133).
    beam_min is min_new_tokens + 1, so the lengths the reference's min_new_tokens forbids are the
    ones penalised. A text is finished when it holds EOS (l. 122-123, 174-175); alive texts never
    do, since candidates that end are kept out of the alive set (l. 126-127). Texts are padded with
    0, not EOS (the zeros of l. 155 and decoding.py:170; an EOS pad would read as "finished"). The
    decoded text is cut at the first EOS (pegasus/eval/text_eval.py:43-45). There are no other
    logits processors: no n-gram ban, no forced EOS. Ties go to the lower index in TF's top_k
    (l. 25); torch.topk does not promise an order for ties. length_norm does not apply here: the
    original has one formula.
    """

    def __init__(self, o: DecodingOptions, tok: Tokens, batch: int, device):
        K, L = o.num_beams, 1 + o.max_new_tokens
        self.o, self.tok, self.B, self.width, self.fill = o, tok, batch, K, tok.pad
        self.scores = torch.zeros(batch, K, device=device)  # (B, K) alive: sum of log-probs
        self.scores[:, 1:] = NEG  # [0, -inf, ...] (l. 151): all beams start identical, only one expands
        self.fin_seqs = torch.full((batch, K, L), self.fill, dtype=torch.long, device=device)  # (B, K, L)
        self.fin_seqs[:, :, 0] = tok.start
        self.fin_scores = torch.full((batch, K), NEG, device=device)  # (B, K) best first
        self.fin_len = torch.zeros(batch, K, dtype=torch.long, device=device)
        self.first_row = torch.arange(batch, device=device)[:, None] * K  # (B, 1)

    def step(self, model, h: torch.Tensor, seqs: torch.Tensor, t: int) -> tuple[bool, torch.Tensor]:
        o, B, K = self.o, self.B, self.width
        logprobs = log_softmax_(model.logits(h).float())  # (B*K, V), no logits processors
        V = logprobs.size(-1)
        total = logprobs.view(B, K, V).add_(self.scores[:, :, None]).view(B, K * V)  # (B, K*V), in place too
        top, idx = total.topk(2 * K)  # (B, 2K) best first (l. 116)
        parent = self.first_row + idx // V  # (B, 2K)
        cand = seqs[parent]  # (B, 2K, L)
        cand[:, :, t + 1] = idx % V
        ended = cand[:, :, t + 1] == self.tok.eos  # (B, 2K); alive texts hold no EOS before this one
        # Alive: the K best that did not end (l. 126-130).
        self.scores, keep = (top + ended * NEG).topk(K)  # (B, K)
        seqs.copy_(cand.gather(1, keep[:, :, None].expand(-1, -1, cand.size(2))).flatten(0, 1))  # (B*K, L)
        # Finished: every ended candidate competes with the K kept so far, whatever its rank (l. 133-141).
        score = original_score(top, t + 1, o.length_penalty, beam_min=o.min_new_tokens + 1) + ~ended * NEG
        self.fin_scores, best = torch.cat([self.fin_scores, score], 1).topk(K)  # (B, K) of 3K
        self.fin_len = torch.cat([self.fin_len, torch.full_like(idx, t + 1)], 1).gather(1, best)
        L = cand.size(2)
        self.fin_seqs = torch.cat([self.fin_seqs, cand], 1).gather(1, best[:, :, None].expand(-1, -1, L))
        return False, parent.gather(1, keep).flatten()  # never finished early: l. 161 "Always do T iterations"

    def result(self, seqs: torch.Tensor, t: int) -> torch.Tensor:
        """Per slot, the finished text if it holds EOS, else the alive one (l. 173-181)."""
        B, K, R = self.B, self.width, self.o.num_return_sequences
        real = (self.fin_seqs == self.tok.eos).any(-1)  # (B, K)
        out = torch.where(real[:, :, None], self.fin_seqs, seqs.view(B, K, -1))[:, :R]  # (B, R, L)
        length = torch.where(real, self.fin_len, t + 1)[:, :R]  # (B, R)
        return out.flatten(0, 1)[:, : 1 + int(length.max())]  # (B*R, 1+T)


def search_rule(o: DecodingOptions, tok: Tokens, batch: int, device):
    """The search rule the options ask for."""
    if o.search == "original":
        if o.num_beams > 1:
            return OriginalBeamSearch(o, tok, batch, device)
        # Beam size 1 is plain greedy in the original (pegasus/layers/decoding.py:140-157): argmax until
        # every row holds EOS or max_new_tokens, no logits processors (check() refused the others), no
        # forced EOS. Greedy pads with 0 after EOS where the original keeps writing argmaxes; the
        # text, cut at the first EOS, is the same.
        return Sampler(o, replace(tok, forced_eos=None), batch, device)
    return BeamSearch(o, tok, batch, device) if o.num_beams > 1 else Sampler(o, tok, batch, device)


# ----------------------------------------------------------------------------- the step loop


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Encoder states (B, S, D), zeros at padding. The reference encodes a padded batch as one; so does
    float32 (bit for bit). A model with `encode_each` (int8, bfloat16 on CPU) encodes each right-padded
    document alone at its own length: no work on padding, whose share of attention grows with the
    square of the length (int8, 4 documents of 505-313 tokens, 2 threads: 1.9 s -> 1.3 s), and an int8
    document's activations are not scaled together with its batch-mates' (quantize.py)."""
    if not model.encode_each or attention_mask is None or input_ids.size(0) == 1:
        return model.encode(input_ids, attention_mask)
    lengths = right_padded_lengths(attention_mask)
    if lengths is None:  # left-padded: positions would shift; as the reference
        return model.encode(input_ids, attention_mask)
    out = torch.zeros(*input_ids.shape, model.config.d_model, dtype=model.dtype, device=input_ids.device)  # (B, S, D)
    for i, n in enumerate(lengths):
        if n:  # (an empty document has no states to compute)
            out[i, :n] = model.encode(input_ids[i: i + 1, :n])[0]  # (n, D)
    return out


def hidden_states(model, seqs, t: int, cache, encoder_out, attention_mask, positions) -> torch.Tensor:
    """The decoder's final states at the newest position t, (n, D)."""
    if cache is not None:  # feed only the newest token; the cache holds the rest
        return model.decode(seqs[:, t: t + 1], cache=cache, input_pos=positions[t: t + 1])[:, -1]  # (n, D)
    # The slow, obviously correct way: re-run the whole prefix.
    return model.decode(seqs[:, : t + 1], encoder_out, attention_mask)[:, -1]  # (n, D)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             options: DecodingOptions = DecodingOptions(), **overrides) -> torch.Tensor:
    """Token ids (B, S) -> (B * num_return_sequences, 1 + T) ids that start with the decoder start
    token, as transformers' generate() returns them. Options come from `options` with keyword
    overrides on top: generate(model, ids, num_beams=4) and generate(model, ids,
    options=DecodingOptions(num_beams=4)) are the same call; an override of None changes nothing.
    Options left unset come from the checkpoint (model.generation_config), else the reference's
    defaults. The reference's max_length / min_length count the start token: max_new_tokens =
    max_length - 1."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    o, tok = resolve(replace(options, **overrides), model)  # replace() refuses unknown names
    check(o, input_ids, attention_mask, model.config.max_position_embeddings)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: attention runs a faster kernel without a mask (as the reference's does)
    B, device = input_ids.size(0), input_ids.device
    search = search_rule(o, tok, B, device)
    n = B * search.width  # hypotheses; rows i*width .. (i+1)*width-1 belong to document i
    encoder_out = encode(model, input_ids, attention_mask)  # (B, S, D), once per document
    cache = model.new_cache(encoder_out, attention_mask, n, o.max_new_tokens) if o.use_cache else None
    if cache is not None:
        encoder_out = None  # the cache holds its keys/values: the states (B, S, D) need not stay for the search
    seqs = input_ids.new_full((n, 1 + o.max_new_tokens), search.fill)  # (n, 1+T)
    seqs[:, 0] = tok.start
    positions = torch.arange(o.max_new_tokens, device=device)
    for t in range(o.max_new_tokens):
        h = hidden_states(model, seqs, t, cache, encoder_out, attention_mask, positions)  # (n, D)
        finished, parents = search.step(model, h, seqs, t)
        if parents is not None and cache is not None:
            cache.reorder(parents)
        if finished:
            break
    return search.result(seqs, t)
