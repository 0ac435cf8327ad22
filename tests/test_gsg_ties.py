"""Gap-sentence selection picks what the original C++ picks, exact ties included.

The original (google-research/pegasus, pegasus/ops/rouge.cc + sentence_selection.cc) scores ROUGE-1 F1
in float32: precision and recall are o/|candidate| and o/|reference| divided in double and rounded to
float32, then F1 = (2*p*r)/(p+r) in float32. Its tie rules: Ind (GetSentenceIndicesByRouge) sorts
(score, index) pairs with std::greater, so on equal scores the LATER sentence ranks first; Seq
(GetSentenceIndicesByGreedyRouge) scans in order replacing the best on `score >= best`, so again the
LATER sentence wins. Each document below is built so that the expected answer follows from those rules
by hand; the scores used to argue it are recomputed here with numpy, never by train.py.
"""

import numpy as np
import pytest

from train import make_gsg_example, rouge1_f1, select_gap_sentences, split_sentences


def f1_float32(o: int, n_candidate: int, n_reference: int) -> float:
    """The original's F1 (ComputeRougeFromCandidateCounts, standard option), transcribed for the tests."""
    p, r = np.float32(o / n_candidate), np.float32(o / n_reference)
    return float(np.float32(2) * p * r / (p + r))


def f1_float64(o: int, n_candidate: int, n_reference: int) -> float:
    p, r = o / n_candidate, o / n_reference
    return 2 * p * r / (p + r)


# Three sentences share "cat dog" (overlap 2 each, same lengths: identical scores), one shares nothing.
TIED = ["cat dog one.", "cat dog two.", "cat dog three.", "zebra yak xylophone wombat."]


@pytest.mark.parametrize("strategy", ["ind-orig", "ind-uniq", "seq-orig", "seq-uniq"])
def test_three_way_tie_goes_to_the_last_sentence(strategy):
    # 4 sentences at GSR 0.3 -> 1 gap sentence; sentences 0, 1, 2 tie, so the rule picks 2.
    assert select_gap_sentences(TIED, 0.3, strategy) == [2]


def test_ind_takes_the_last_two_of_a_tie_and_seq_the_tie_of_round_two():
    # GSR 0.5 -> 2 gap sentences. Ind: the top two of the three tied are the later two, 1 and 2.
    assert select_gap_sentences(TIED, 0.5, "ind-orig") == [1, 2]
    # Seq round 1 picks 2 (as above). Round 2 scores F1(selected + s, remaining - s):
    #   s = 0: {cat dog three one} (6 words) vs {cat dog two zebra yak xylophone wombat} (7), overlap 2
    #   s = 1: the same counts (6 vs 7, overlap 2)
    #   s = 3: {cat dog three zebra yak xylophone wombat} (7) vs {cat dog one cat dog two} (6), overlap 2
    # F1 is symmetric in (p, r) in float32 too (2*p*r and p + r commute exactly), so all three tie
    # and the last scanned, sentence 3, wins even though it shares no word with the rest.
    assert f1_float32(2, 6, 7) == f1_float32(2, 7, 6)
    assert select_gap_sentences(TIED, 0.5, "seq-orig") == [2, 3]


def test_uniq_counts_each_word_once_and_its_tie_rule_decides():
    doc = ["cat cat dog emu ant.", "cat dog fox gnu.", "cat dog hen bee."]
    # Orig: 13 words. Sentence 0 (5 words) overlaps the rest (8) in cat x2 + dog = 3; sentences 1 and 2
    # (4 words vs 9) overlap in 2. F1 = 2o/13: 6/13 beats 4/13, so sentence 0.
    assert f1_float32(3, 5, 8) > f1_float32(2, 4, 9)
    assert select_gap_sentences(doc, 0.3, "ind-orig") == [0]
    assert select_gap_sentences(doc, 0.3, "seq-orig") == [0]
    # Uniq: every sentence has 4 distinct words, the rest 6, and 2 shared (cat, dog): a three-way
    # tie, and the last sentence wins.
    assert select_gap_sentences(doc, 0.3, "ind-uniq") == [2]
    assert select_gap_sentences(doc, 0.3, "seq-uniq") == [2]


# 42 words. Sentences 0 (4 words) and 1 (5 words) each share 2 words with the rest ("alpha", "gamma"),
# so both score F1 = 2*2/42 exactly; 2 and 3 share nothing.
NOISE = ["alpha gamma xa xb.", "alpha gamma ya yb yc.",
         " ".join(f"c{i}" for i in range(17)) + ".", " ".join(f"d{i}" for i in range(16)) + "."]


def test_float64_rounding_noise_no_longer_decides():
    assert sum(len(s.split()) for s in NOISE) == 42
    # In float64 the two routes to 4/42 round differently and sentence 0 would win outright ...
    assert f1_float64(2, 4, 38) > f1_float64(2, 5, 37)
    # ... in the original's float32 they are the same number, so the tie rule gives sentence 1.
    assert f1_float32(2, 4, 38) == f1_float32(2, 5, 37)
    for strategy in ("ind-orig", "seq-orig"):
        assert select_gap_sentences(NOISE, 0.3, strategy) == [1]
    assert make_gsg_example(" ".join(NOISE))[1] == NOISE[1]


def test_rouge1_f1_is_the_float32_value():
    a, b = ["alpha", "gamma", "xa", "xb"], ["alpha", "gamma"] + [f"w{i}" for i in range(36)]
    assert rouge1_f1(a, b) == f1_float32(2, 4, 38) != f1_float64(2, 4, 38)
    assert rouge1_f1(b, a) == rouge1_f1(a, b)


def test_tokens_and_sentences_as_the_original_cuts_them():
    # Only ASCII letters are lowercased and only [a-z0-9] runs are words (absl::AsciiStrToLower, then
    # [^a-z0-9]+ -> " "): the Kelvin sign U+212A is a separator there, though Python's str.lower()
    # makes it "k". So "\u212aelvin" is the word "elvin", shares nothing, and all three sentences
    # score 0: a tie, won by the last. (Had it become "kelvin", sentences 0 and 1 would outscore 2.)
    doc = ["\u212aelvin.", "kelvin x.", "y z."]
    assert select_gap_sentences(doc, 0.3, "ind-orig") == [2]
    assert select_gap_sentences(doc, 0.3, "seq-orig") == [2]
    # std::regex's \\s on bytes is ASCII whitespace: a no-break space after "." does not cut.
    assert split_sentences("One.\u00a0Two. Three.") == ["One.\u00a0Two.", "Three."]
