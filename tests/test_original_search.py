"""The original PEGASUS beam search (decoding.OriginalBeamSearch, search="original"), rule by rule.

Each rule is shown on a case built for it, with a scripted "language model": a table from the tokens
generated so far to the next-token probabilities, so every score can be worked out by hand (the
expected outcome is derived in the comments, never computed by the code under test). The real step
loop (decoding.generate, use_cache=False) runs it. Vocabulary: 0 pad/start, 1 EOS, 2..5 words.
"""


import numpy as np
import pytest
import torch
from toy import ScriptedLM
from toy import run_scripted as run

from decoding import DecodingOptions, generate, original_score


def test_a_late_ranked_finished_candidate_is_admitted():
    # K = 2, alpha = 0 (scores are plain log-probabilities, compared here as probabilities).
    # Step 0: [2] .6, [3] .4.  Step 1, the 2K = 4 candidates, best first:
    #   [2,4] .6*.55 = .33   [3,5] .4*.7 = .28   [2,EOS] .6*.45 = .27   [3,EOS] .4*.3 = .12
    # The two that end rank 3rd and 4th: the reference admits neither (only the first K may finish);
    # the original admits both. Step 2 (the last): the default row {EOS .3, 2 .25, ...} gives at most
    # [2,4,EOS] .33*.3 = .099 < .27, so the original's best finished text is [2,EOS]. The reference
    # never saw it: at its last step every candidate ends, and its best is [2,4,EOS] .099.
    table = {(): {2: .6, 3: .4}, (2,): {4: .55, 1: .45}, (3,): {5: .7, 1: .3}}
    default = {1: .3, 2: .25, 3: .2, 4: .15, 5: .1}
    options = dict(num_beams=2, length_penalty=0.0, max_new_tokens=3)
    assert run(ScriptedLM(table, default), search="original", **options) == [[0, 2, 1]]
    assert run(ScriptedLM(table, default), **options) == [[0, 2, 4, 1]]


def test_no_early_stop():
    # K = 2, alpha = 0. Step 0: [EOS] .5 ends (ranked first), [2] .3 and [3] .2 run on. Step 1: [2,EOS]
    # .27 and [3,EOS] .18 rank first and second and end; the best alive, [2,5] .3*.1 = .03, cannot beat
    # the worst finished (.27): the reference stops after 2 steps. The original runs all 6 and returns
    # the same best text, [EOS].
    table = {(): {1: .5, 2: .3, 3: .2}, (2,): {1: .9, 5: .1}, (3,): {1: .9, 5: .1}}
    options = dict(num_beams=2, length_penalty=0.0, max_new_tokens=6)
    reference, original = ScriptedLM(table), ScriptedLM(table)
    assert run(reference, **options) == [[0, 1]] and reference.calls == 2
    assert run(original, search="original", **options) == [[0, 1]] and original.calls == 6


def test_finished_is_preferred_over_alive_per_slot():
    # K = 2, alpha = 0, two steps. Step 0: [2] .5, [3] .4, [EOS] .1 (finished, 3rd). Step 1: [2,4] .45,
    # [3,5] .36, [2,5] .05, [3,4] .04: nothing ends. Slot 0 holds the finished [EOS] (.1), preferred to
    # the alive [2,4] (.45); slot 1 holds no finished text, so the alive beam of slot 1, [3,5], is used
    # (unfinished: the original forces no EOS at the length limit). The reference, whose last step
    # ends every beam, returns [2,4] then [3,5].
    table = {(): {2: .5, 3: .4, 1: .1}, (2,): {4: .9, 5: .1}, (3,): {5: .9, 4: .1}}
    options = dict(num_beams=2, length_penalty=0.0, max_new_tokens=2, num_return_sequences=2)
    assert run(ScriptedLM(table), search="original", **options) == [[0, 1, 0], [0, 3, 5]]
    assert run(ScriptedLM(table), **options) == [[0, 2, 4], [0, 3, 5]]


def test_original_score_by_hand():
    # -6 / ((5 + 7) / 6) ** 0.8 = -6 / 2 ** 0.8 = -3.44608...
    assert float(original_score(torch.tensor(-6.0), 7, 0.8)) == pytest.approx(-6 / 2 ** 0.8)
    assert float(original_score(torch.tensor(-6.0), 1, 1.0)) == pytest.approx(-6.0)  # (5 + 1) / 6 = 1
    # The -1000 penalty outside [beam_min, beam_max]; beam_max <= 0 means no upper limit.
    assert float(original_score(torch.tensor(-6.0), 7, 0.0, beam_min=8)) == pytest.approx(-1006.0)
    assert float(original_score(torch.tensor(-6.0), 7, 0.0, beam_min=7, beam_max=6)) == pytest.approx(-1006.0)
    assert float(original_score(torch.tensor(-6.0), 7, 0.0, beam_min=7, beam_max=7)) == pytest.approx(-6.0)
    assert float(original_score(torch.tensor(-6.0), 700, 0.0, beam_max=-1)) == pytest.approx(-6.0)


def test_length_normalisation_starts_at_5():
    # K = 2, alpha = 1. Finished texts (length counts EOS):
    #   [EOS]      p .3               log -1.2040  length 1   norm (5+1)/6 = 1      score -1.2040
    #   [2,EOS]    p .6*.1 = .06      log -2.8134  length 2   norm 7/6              score -2.4115
    #   [2,4,EOS]  p .6*.9*.25 = .135 log -2.0025  length 3   norm 8/6              score -1.5019
    # The original picks [EOS]. Dividing by length ** alpha instead (no start) would give -1.2040,
    # -1.4067, -0.6675 and pick [2,4,EOS].
    table = {(): {2: .6, 1: .3, 3: .1}, (2,): {4: .9, 1: .1}, (2, 4): {1: .25, 5: .75}}
    assert run(ScriptedLM(table), search="original", num_beams=2, length_penalty=1.0, max_new_tokens=3) == [[0, 1]]


def test_beam_min_penalises_short_texts_instead_of_blocking_eos():
    # K = 2, alpha = 0, min_new_tokens = 1, so beam_min = 2: [EOS] (length 1) scores log .5 - 1000;
    # [2,EOS] (length 2) log(.3*.5) = -1.90 wins. EOS was not blocked: [EOS] was a finished candidate.
    table = {(): {1: .5, 2: .3, 3: .2}, (2,): {1: .5, 5: .5}}
    options = dict(search="original", num_beams=2, length_penalty=0.0, max_new_tokens=2)
    assert run(ScriptedLM(table), **options) == [[0, 1]]
    assert run(ScriptedLM(table), min_new_tokens=1, **options) == [[0, 2, 1]]


def test_beam_1_is_plain_greedy():
    # Argmax each step: 2 (.6), then 3 (.7); max_new_tokens 2. No forced EOS at the limit in the
    # original (the reference forces it: the checkpoint's forced_eos_token_id).
    table = {(): {2: .6, 1: .4}, (2,): {3: .7, 1: .3}}
    assert run(ScriptedLM(table, forced_eos=1), search="original", num_beams=1, max_new_tokens=2) == [[0, 2, 3]]
    assert run(ScriptedLM(table, forced_eos=1), num_beams=1, max_new_tokens=2) == [[0, 2, 1]]
    # It stops when every row holds EOS: 2 steps of 5.
    lm = ScriptedLM({(): {2: .6, 1: .4}, (2,): {1: .8, 3: .2}})
    assert run(lm, search="original", num_beams=1, max_new_tokens=5) == [[0, 2, 1]] and lm.calls == 2


def test_documents_of_a_batch_are_searched_apart():
    # Two copies of the late-ranked case in one batch: the same answer for each (rows don't mix).
    table = {(): {2: .6, 3: .4}, (2,): {4: .55, 1: .45}, (3,): {5: .7, 1: .3}}
    options = DecodingOptions(search="original", num_beams=2, length_penalty=0.0, max_new_tokens=3, use_cache=False)
    out = generate(ScriptedLM(table, {1: .3, 2: .25, 3: .2, 4: .15, 5: .1}), torch.tensor([[7, 1], [8, 1]]),
                   options=options)
    assert out.tolist() == [[0, 2, 1], [0, 2, 1]]


def test_refused_combinations():
    lm = ScriptedLM({})
    for bad, match in ((dict(search="tf"), "search must be"), (dict(do_sample=True), "no sampling"),
                       (dict(no_repeat_ngram_size=3, num_beams=2), "n-gram"),
                       (dict(min_new_tokens=2, num_beams=1), "minimum length")):
        with pytest.raises(ValueError, match=match):
            run(lm, **{"search": "original", "max_new_tokens": 3, **bad})


def test_the_checkpoints_min_length_is_not_the_originals():
    # The reference reads min_length from the checkpoint; the original's beam_min is 0 in every published
    # config, so search="original" ignores it: [EOS] (.5) wins at once.
    lm = ScriptedLM({(): {1: .5, 2: .3, 3: .2}, (2,): {1: .5, 5: .5}})
    lm.generation_config = {"min_length": 3, "num_beams": 2, "length_penalty": 0.0}
    assert run(lm, search="original", max_new_tokens=2) == [[0, 1]]


def test_a_real_model_runs_with_the_kv_cache():
    # The cache is reordered from the rule's parents like the reference's: cached and uncached agree.
    from pegasus import Pegasus, PegasusConfig
    torch.manual_seed(0)
    model = Pegasus(PegasusConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64)).eval()
    ids = torch.randint(2, 40, (3, 9))
    kw = dict(search="original", num_beams=3, max_new_tokens=12, length_penalty=0.8, num_return_sequences=2)
    cached, slow = generate(model, ids, **kw), generate(model, ids, use_cache=False, **kw)
    np.testing.assert_array_equal(cached.numpy(), slow.numpy())
    assert cached.shape[0] == 6
