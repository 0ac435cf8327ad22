"""Gap Sentences Generation (GSG), PEGASUS's pre-training objective (Zhang et al. 2020,
https://arxiv.org/abs/1912.08777, section 3.1): remove whole sentences from a document, put a
<mask_1> where each was, and train the model to write the removed sentences, a task shaped like
summarisation. Which sentences go is decided by ROUGE-1 against the rest of the document (the
"principal" sentences), computed with the original code's arithmetic (pegasus/ops/rouge.cc,
sentence_selection.cc), so the same sentences are picked, ties included.

Small pure functions: split_sentences -> select_gap_sentences -> make_gsg_example; train.py turns
the examples into batches.
"""

import random
import re
from collections import Counter

import numpy as np

MASK_SENTENCE, MASK_WORD = "<mask_1>", "<mask_2>"  # ids 2 and 3 (tokenizer.py)
STRATEGIES = ("ind-orig", "ind-uniq", "seq-orig", "seq-uniq", "lead", "random")

def split_sentences(text: str) -> list[str]:
    """Cut after runs of . ! ? followed by whitespace, as the original (SentenceSegment in
    pegasus/ops/parsing_utils.cc): crude, "e.g. x" splits. Whitespace is ASCII only, as std::regex's
    \\s on bytes is (Python's \\s would also cut at a no-break space)."""
    return [s for s in re.split(r"(?<=[.!?])[ \t\n\v\f\r]+", text.strip(" \t\n\v\f\r")) if s]


def rouge_tokens(text: str) -> Counter:
    """ROUGE-1 counts as the original makes them (PrecomputeSentenceData, pegasus/ops/rouge.cc): ASCII
    letters lowercased, runs of a-z and 0-9 are words, everything else (any non-ASCII too) separates."""
    return Counter(w.lower() for w in re.findall(r"[A-Za-z0-9]+", text))


def rouge1_f1(a_tokens, b_tokens, unique: bool = False) -> float:
    """ROUGE-1 F1 of two token lists (or Counters), symmetric, with the original's arithmetic
    (ComputeRougeFromCandidateCounts in pegasus/ops/rouge.cc). The paper's "Orig" counts repeated words
    as often as they occur (clipped overlap, the "standard" option); "Uniq" counts each distinct word
    once (the "deduplicate" option).

    Why float32, step by step: the overlap o is an exact count; precision and recall are o/|a| and
    o/|b| divided in double and rounded to float32; F1 = (2*p*r)/(p+r) is then computed in float32.
    Exact ties are common (within a document, F1 = 2o/(|s| + |rest|) = 2o/|document| for Ind), and
    the same fraction reached from different sentence lengths can round to different floats, in
    float32 as in float64, but not to the same ones: 4/42 from 4 + 38 words and from 5 + 37 is one
    float32 (so the tie rule picks the later sentence) but two float64s (0.09523809523809525 and
    ...523, so float64 would pick the earlier). The original's choices are what its float32 gives,
    the tie rule deciding where the floats are equal; only the same arithmetic reproduces them.
    (Returned as a Python float holding the float32 value.)
    """
    a, b = +Counter(a_tokens), +Counter(b_tokens)  # unary + drops zero counts left by subtraction
    if unique:
        a, b = Counter(a.keys()), Counter(b.keys())
    overlap = sum((a & b).values())
    if overlap == 0:
        return 0.0
    f32 = np.float32
    precision, recall = f32(overlap / sum(a.values())), f32(overlap / sum(b.values()))  # double /, then float
    return float(f32(2) * precision * recall / (precision + recall))  # all float32 from here


def num_gap_sentences(n: int, ratio: float) -> int:
    """How many of n sentences to mask: the gap sentences ratio (GSR) times n, rounded down, at least
    one and at most n, as in the original code (GetNumMaskedSentences in sentence_selection.cc).
    The 1e-9 stops float error from losing a sentence: 0.7 * 90 is 62.99999999999999 in floats."""
    return min(n, max(1, int(n * ratio + 1e-9)))


def max_num_sentences(max_input_len: int, max_target_len: int, ratio: float) -> int:
    """How many leading sentences the seq-* strategies may pick from, as the original caps them "to speed
    up the sentence selection" (MaxNumSentences, pegasus/ops/pretrain_parsing_ops.cc lines 86-88, and
    its caller, lines 366-371): max(max_input_len / 20.0, max_target_len / ratio / 20.0), the lengths
    in tokens, at least 1. The arithmetic is the C++'s: int / float is a float32 division (ratio is a
    float attribute), / 20.0 is in double, and the int return truncates. 42 at the published 512/256
    tokens (pegasus_params.py) and GSR 0.3: 256 / 0.3f = 853.33 -> 42.67 -> 42."""
    by_target = float(np.float32(max_target_len) / np.float32(ratio)) / 20.0
    return max(1, int(max(max_input_len / 20.0, by_target)))


def select_gap_sentences(sentences: list[str], ratio: float = 0.3, strategy: str = "ind-orig",
                         seed: int | None = None, *, max_input_len: int | None = None,
                         max_target_len: int | None = None) -> list[int]:
    """Indices (sorted) of the sentences to mask. Strategies of section 3.1:

      lead      the first m sentences;       random   m sentences uniformly at random (`seed`);
      ind-*     "Principal", scored independently: ROUGE-1 F1 of each sentence vs the rest, top m;
      seq-*     "Principal", selected sequentially (Algorithm 1): greedily add the sentence that
                maximises ROUGE-1 F1 between the selected set and the remaining sentences;
      *-orig / *-uniq   n-grams counted with repeats / as a set.

    The ablations (section 6.1, figure 4) found Ind-Orig best and gap sentences ratios below 50% best;
    the paper uses 30%, the default. The released "Mixed & Stochastic" checkpoints draw the ratio from
    15-45% per document and add 20% noise to the scores (the authors' README; pegasus_params.py).

    Scores and ties are the original's (rouge1_f1; tests/test_gsg_ties.py checks them against a
    transcription of the C++). Not reproduced: for seq-*, the original first keeps only the first
    max(max_input_len / 20, max_target_len / ratio / 20) sentences (MaxNumSentences in
    pretrain_parsing_ops.cc; 42 at 512/256 tokens and GSR 0.3), still scoring against the whole text.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"gap sentences ratio must be in (0, 1], got {ratio}")
    if (max_input_len is None) != (max_target_len is None):
        raise ValueError("give both max_input_len and max_target_len, or neither")
    n = len(sentences)
    m = num_gap_sentences(n, ratio)
    if strategy == "lead":
        return list(range(m))
    if strategy == "random":
        return sorted(random.Random(seed).sample(range(n), m))
    unique = strategy.endswith("uniq")
    counts = [rouge_tokens(s) for s in sentences]
    total = sum(counts, Counter())  # the whole document's words: the sentences cover them all
    if strategy.startswith("ind"):
        # GetSentenceIndicesByRouge (pegasus/ops/sentence_selection.cc): each sentence scored against
        # the rest of the document, pairs (score, index) sorted with std::greater, so on equal
        # (float32) scores the LATER sentence ranks first; the top m are taken.
        scores = [rouge1_f1(c, total - c, unique) for c in counts]
        ranked = sorted(range(n), key=lambda i: (scores[i], i), reverse=True)
        return sorted(ranked[:m])
    if max_input_len is not None:  # the seq-* cap (max_num_sentences); `total` stays the whole text
        n = min(n, max_num_sentences(max_input_len, max_target_len, ratio))
        m = num_gap_sentences(n, ratio)
    # GetSentenceIndicesByGreedyRouge: each round scans the unselected sentences in order and keeps
    # the one maximising F1(selected + s, remaining - s), replacing the best on `score >= best`, so
    # again the LAST of equal scores wins.
    chosen, selected = [], Counter()
    for _ in range(m):
        best, best_score = -1, -1.0
        for i in range(n):
            if i in chosen:
                continue
            score = rouge1_f1(selected + counts[i], total - selected - counts[i], unique)
            if score >= best_score:
                best, best_score = i, score
        chosen.append(best)
        selected += counts[best]
    return sorted(chosen)


def make_gsg_example(text: str, ratio: float = 0.3, strategy: str = "ind-orig", mlm_prob: float = 0.0,
                     seed: int | None = None, *, max_input_len: int | None = None,
                     max_target_len: int | None = None) -> tuple[str, str]:
    """One pre-training pair from a document: source = the document with each selected sentence
    replaced by <mask_1>; target = the selected sentences in document order, joined by spaces.

    mlm_prob > 0 adds the paper's masked-language-model noise (section 3.2, as in BERT) to the
    sentences left in the source: that fraction of their words (at least one) is picked, and each
    becomes <mask_2> with probability 0.8, a random word of the document with 0.1 (the original draws
    a vocabulary piece) or stays with 0.1. Whitespace words are masked whole, as the original's
    whole-word masking does. The paper's encoder-side loss on those words is not implemented, so here
    MLM only makes GSG harder; the paper found MLM stops helping with long pre-training (section
    6.1.2) and left it out of PEGASUS-large (section 6.2), hence the default 0.
    max_input_len / max_target_len: the seq-* sentence cap (select_gap_sentences).
    """
    if not 0.0 <= mlm_prob < 1.0:
        raise ValueError(f"mlm_prob must be in [0, 1), got {mlm_prob}")
    sentences = split_sentences(text)
    if not sentences:
        raise ValueError("the document has no sentences (empty text)")
    chosen = set(select_gap_sentences(sentences, ratio, strategy, seed, max_input_len=max_input_len,
                                      max_target_len=max_target_len))
    pieces = [s.split() for s in sentences]
    if mlm_prob > 0:
        rng = random.Random(seed)
        slots = [(i, j) for i, ws in enumerate(pieces) if i not in chosen for j in range(len(ws))]
        vocabulary = [w for ws in pieces for w in ws]
        for i, j in rng.sample(slots, max(1, int(len(slots) * mlm_prob)) if slots else 0):
            u = rng.random()
            if u < 0.8:
                pieces[i][j] = MASK_WORD
            elif u < 0.9:
                pieces[i][j] = rng.choice(vocabulary)
    source = " ".join(MASK_SENTENCE if i in chosen else " ".join(ws) for i, ws in enumerate(pieces))
    target = " ".join(sentences[i] for i in sorted(chosen))
    return source, target
