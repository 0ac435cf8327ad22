"""decoding.generate (re-exported by generate.py) against transformers' generate(): identical token ids, rule by rule.

The models are trained for a few hundred steps on the toy task in toy.py (seconds), so that they
have real preferences: beam search disagrees with greedy decoding, outputs have different lengths,
and every rule (length penalty, early stopping, minimum length, n-gram blocking) changes something.
Each test checks that the rule is not a no-op on these inputs as well as checking parity.
"""

import copy

import pytest
import torch
from toy import TOY, ScriptedLM, from_reference, pad_batch, run_scripted, texts, to_reference, toy_sources

from decoding import DecodingOptions
from generate import generate
from onednn import PACK_ROWS, OneDNNLinear, use_onednn
from pegasus import PegasusConfig
from screen import ScreenedArgmax, fbgemm_screen_available, int8pack_available, screen_kernel, screened_argmax

TOY = PegasusConfig(**TOY)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def toy(toy_pegasus):
    """The toy model conftest.py trains once (TOY, seed 0, one thread: what this module trained on its own before),
    copied, since tests here set its generation_config; and its twin in the reference library."""
    model = copy.deepcopy(toy_pegasus)
    return model, to_reference(model)


@pytest.fixture(scope="module")
def batch():
    """16 sources of 2..6 tokens, right-padded (so 5 different lengths), the last three with repeated
    n-grams that n-gram blocking must break."""
    sources = toy_sources(13, TOY.vocab_size, torch.Generator().manual_seed(1234))
    sources += [[8, 9, 8, 9, 8], [12, 12, 12], [10, 11, 10, 11, 13]]
    return pad_batch(sources, TOY.pad_token_id, TOY.eos_token_id)


def reference(ref, ids, mask, **kw):
    with torch.no_grad():
        return ref.generate(ids, attention_mask=mask, **kw)


def n_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    return sum(x != y for x, y in zip(texts(a), texts(b)))


CASES = {
    "greedy": dict(num_beams=1),
    "beam8_lp0.6": dict(num_beams=8, length_penalty=0.6),
    "beam2_early_stop_true": dict(num_beams=2, length_penalty=1.0, early_stopping=True),
    "beam2_early_stop_false": dict(num_beams=2, length_penalty=1.0, early_stopping=False),
    "beam2_early_stop_never": dict(num_beams=2, length_penalty=2.0, early_stopping="never"),
    "beam3_negative_lp": dict(num_beams=3, length_penalty=-1.0),
    "beam4_min_new_tokens": dict(num_beams=4, min_new_tokens=8, max_new_tokens=10),
    "greedy_min_new_tokens": dict(num_beams=1, min_new_tokens=8),
    "beam4_max_new_tokens_forces_eos": dict(num_beams=4, max_new_tokens=3),
    "greedy_no_repeat_1gram": dict(num_beams=1, no_repeat_ngram_size=1),
    "beam4_no_repeat_2gram": dict(num_beams=4, no_repeat_ngram_size=2),
    "beam4_return_3": dict(num_beams=4, num_return_sequences=3, length_penalty=0.8),
}


@pytest.mark.parametrize("case", CASES)
def test_same_ids_as_reference(toy, batch, case):
    model, ref = toy
    kw = {"max_new_tokens": 14} | CASES[case]
    expected = reference(ref, *batch, **kw)
    cached = generate(model, *batch, **kw)
    assert cached.shape == expected.shape and torch.equal(cached, expected), case
    uncached = generate(model, *batch, use_cache=False, **kw)  # re-runs the whole prefix every step
    assert torch.equal(uncached, cached), case


def test_unpadded_input_matches_reference(toy, batch):
    """Without padding the mask is dropped (a faster attention kernel), as the reference does too."""
    model, ref = toy
    ids = batch[0][:1, : int(batch[1][0].sum())]  # (1, S), no padding
    for kw in (dict(num_beams=1), dict(num_beams=8, length_penalty=0.6)):
        expected = reference(ref, ids, torch.ones_like(ids), max_new_tokens=14, **kw)
        assert torch.equal(generate(model, ids, torch.ones_like(ids), max_new_tokens=14, **kw), expected)
        assert torch.equal(generate(model, ids, max_new_tokens=14, **kw), expected)


def test_toy_model_is_not_degenerate(toy, batch):
    model, _ = toy
    greedy = generate(model, *batch, max_new_tokens=14, num_beams=1)
    beam = generate(model, *batch, max_new_tokens=14, num_beams=8, length_penalty=0.6)
    assert len(set(greedy[:, 1:].flatten().tolist())) > 5  # many different tokens
    assert len({len(t) for t in texts(greedy)}) > 2  # and different lengths
    assert all(t[-1] == 1 for t in texts(beam))  # every text ends with EOS before the limit
    assert n_differ(greedy, beam) >= 3  # beam search finds what greedy misses


def test_rules_change_the_output(toy, batch):
    """The parity cases above are only meaningful if each rule matters on these inputs."""
    model, _ = toy
    run = lambda **kw: generate(model, *batch, **({"max_new_tokens": 14} | kw))
    greedy, beam2 = run(num_beams=1), run(num_beams=2, length_penalty=1.0)
    assert n_differ(beam2, run(num_beams=2, length_penalty=3.0)) > 0
    # early_stopping=True changes some text under some of these settings. "never" cannot, on this task:
    # when the copy finishes, the short "half" text is still the worst finished one, and the running
    # MARK beam beats it at every length, so early_stopping=False never stops early either (toy.py);
    # test_early_stopping_never_on_a_case_built_for_it shows that rule instead.
    assert sum(n_differ(run(num_beams=k, length_penalty=lp), run(num_beams=k, length_penalty=lp, early_stopping=True))
               for k in (2, 3) for lp in (1.0, 2.0, 3.0)) > 0
    assert n_differ(greedy, run(num_beams=1, no_repeat_ngram_size=1)) > 0
    assert n_differ(run(num_beams=4), run(num_beams=4, no_repeat_ngram_size=2)) > 0
    at_least_8 = run(num_beams=4, min_new_tokens=8, max_new_tokens=10)
    assert all(len(t) >= 9 for t in texts(at_least_8))  # 8 tokens, then EOS at the earliest
    short = run(num_beams=4, max_new_tokens=3)
    assert short.shape[1] <= 4 and all(t[-1] == 1 for t in texts(short))  # EOS forced at the limit


def test_checkpoint_settings_are_the_defaults(toy, batch):
    """model.generation_config fills what the call leaves out; max_length/min_length count the start
    token, as in the reference."""
    model, ref = toy
    settings = {"num_beams": 4, "length_penalty": 0.8, "max_length": 9, "min_length": 5, "no_repeat_ngram_size": 2}
    model.generation_config = dict(settings)
    try:
        ours = generate(model, *batch)
        overridden = generate(model, *batch, num_beams=1, max_new_tokens=6)
    finally:
        model.generation_config = {}
    assert torch.equal(ours, reference(ref, *batch, **settings))
    assert torch.equal(overridden, reference(ref, *batch, **(settings | {"num_beams": 1, "max_length": 7})))


def test_options_object_and_keywords_are_the_same_call(toy, batch):
    """DecodingOptions is frozen; keywords override it; unknown names are refused."""
    import dataclasses

    model, _ = toy
    beam4 = DecodingOptions(num_beams=4, max_new_tokens=14, length_penalty=0.6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        beam4.num_beams = 2
    expected = generate(model, *batch, num_beams=4, max_new_tokens=14, length_penalty=0.6)
    assert torch.equal(generate(model, *batch, options=beam4), expected)
    assert torch.equal(generate(model, *batch, options=dataclasses.replace(beam4, num_beams=2), num_beams=4), expected)
    assert torch.equal(generate(model, *batch, options=beam4, num_beams=None), expected)  # None changes nothing
    assert not torch.equal(generate(model, *batch, options=beam4, num_beams=1), expected)
    with pytest.raises(TypeError, match="num_beam"):
        generate(model, *batch, num_beam=4)


def test_sampling_is_reproducible_and_matches_reference(toy, batch):
    model, ref = toy
    kw = dict(do_sample=True, temperature=0.8, top_k=8, top_p=0.9, max_new_tokens=14, num_return_sequences=2)
    a, b = generate(model, *batch, seed=3, **kw), generate(model, *batch, seed=3, **kw)
    assert torch.equal(a, b) and a.shape[0] == 2 * batch[0].shape[0]
    assert n_differ(a, generate(model, *batch, seed=4, **kw)) > 0
    torch.manual_seed(3)  # the reference draws from the global generator; same seed, same draws
    assert torch.equal(a, reference(ref, *batch, **kw))


@pytest.mark.parametrize("length_norm", ["reference", "gnmt"])
def test_beams_are_ranked_by_normalised_score(toy, batch, length_norm):
    """Rescore the returned beams by teacher forcing: best first under the chosen normalisation."""
    model, _ = toy
    alpha, R = 1.5, 4
    out = generate(model, *batch, max_new_tokens=14, num_beams=4, num_return_sequences=R, length_penalty=alpha,
                   length_norm=length_norm)
    ids, mask = (x.repeat_interleave(R, 0) for x in batch)
    with torch.no_grad():
        logp = model(ids, mask, out[:, :-1]).log_softmax(-1).gather(-1, out[:, 1:, None])[..., 0]  # (B*R, T)
    for i, text in enumerate(texts(out)):
        norm = len(text) ** alpha if length_norm == "reference" else ((5 + len(text)) / 6) ** alpha
        logp[i, 0] = logp[i, : len(text)].sum() / norm
    scores = logp[:, 0].view(-1, R)  # (B, R)
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-4).all()
    if length_norm == "gnmt":
        ref_norm = generate(model, *batch, max_new_tokens=14, num_beams=4, num_return_sequences=R, length_penalty=alpha)
        assert n_differ(out, ref_norm) > 0


def test_bad_arguments_are_named(toy, batch):
    model, _ = toy
    for kw, words in [(dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
                      (dict(num_beams=1, num_return_sequences=2), "num_return_sequences"),
                      (dict(num_beams=2, do_sample=True), "num_beams=1"),
                      (dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(max_new_tokens=65), "max_new_tokens"),
                      (dict(early_stopping="sometimes"), "early_stopping")]:
        with pytest.raises(ValueError, match=words):
            generate(model, *batch, **({"max_new_tokens": 5} | kw))
    with pytest.raises(ValueError, match="LongTensor"):
        generate(model, batch[0].float(), max_new_tokens=5)


def test_published_xsum_shape(published_configs):
    """Full google/pegasus-xsum shape, random weights, its own decoding settings (beam 8, length
    penalty 0.6, forced EOS), a padded batch of three lengths, a few tokens."""
    import transformers

    fields = {k: v for k, v in published_configs["google/pegasus-xsum"].items() if k != "generation"}
    torch.manual_seed(0)
    ref = transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(**fields)).eval()
    model = from_reference(ref)  # shares the weights
    model.generation_config = dict(published_configs["google/pegasus-xsum"]["generation"])
    g = torch.Generator().manual_seed(0)
    ids, mask = pad_batch([torch.randint(200, 20000, (n,), generator=g).tolist() for n in (5, 17, 11)], 0, 1)
    ours = generate(model, ids, mask, max_new_tokens=6)
    assert ours.shape[0] == 3 and ours.shape[1] > 1
    assert torch.equal(ours, reference(ref, ids, mask, num_beams=8, length_penalty=0.6, max_new_tokens=6))


def test_onednn_matmuls_give_the_same_tokens(toy, batch):
    """What the CLI runs for float32 on CPU: packed matmuls, and the screened argmax when greedy."""
    model, _ = toy
    fast = use_onednn(copy.deepcopy(model))
    argmax = screened_argmax(fast)
    if not isinstance(fast.decoder.layers[0].fc1, OneDNNLinear):
        pytest.skip("oneDNN is not available in this PyTorch build")
    dec = batch[0][:, :5]
    with torch.no_grad():
        torch.testing.assert_close(fast(*batch, dec), model(*batch, dec), rtol=0, atol=1e-5)
    assert argmax is not None or screen_kernel() is None, "no screened argmax on this build"
    for kw in (dict(num_beams=1), dict(num_beams=8, length_penalty=0.6), dict(num_beams=4, num_return_sequences=4)):
        assert torch.equal(generate(fast, *batch, max_new_tokens=14, **kw, argmax=argmax),
                           generate(model, *batch, max_new_tokens=14, **kw))


def test_one_row_packing_is_the_decoders_step_matmuls_and_gives_the_same_tokens(toy, batch):
    """use_onednn(step_rows=1), what the CLI packs for greedy over one document: the decoder's per-step
    matmuls in oneDNN's one-row layout; the encoder's and cross-attention's keys/values (run on every
    source position) blocked. Any decoding still gives the default path's tokens, one row or many."""
    model, _ = toy
    fast = use_onednn(copy.deepcopy(model), step_rows=1)
    if not isinstance(fast.decoder.layers[0].fc1, OneDNNLinear):
        pytest.skip("oneDNN is not available in this PyTorch build")
    rows = {name: m.rows for name, m in fast.named_modules() if isinstance(m, OneDNNLinear)}
    one_row = {n for n, r in rows.items() if r == 1}
    per_step = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "encoder_attn.q_proj", "encoder_attn.out_proj", "fc1", "fc2")
    assert one_row == {f"decoder.layers.{i}.{m}" for i in range(len(model.decoder.layers)) for m in per_step}
    assert set(rows.values()) == {1, PACK_ROWS}  # the encoder's and cross k/v's: blocked
    assert {m.rows for m in use_onednn(copy.deepcopy(model), step_rows=8).modules()
            if isinstance(m, OneDNNLinear)} == {PACK_ROWS}
    argmax = screened_argmax(fast)
    one = batch[0][:1], batch[1][:1]
    for ids, kw in ((one, dict(num_beams=1)), (batch, dict(num_beams=1)), (batch, dict(num_beams=4))):
        assert torch.equal(generate(fast, *ids, max_new_tokens=14, **kw, argmax=argmax),
                           generate(model, *ids, max_new_tokens=14, **kw))


def test_bfloat16_screened_argmax_gives_the_models_own_tokens(toy, batch):
    """What --dtype bfloat16 runs on CPU, greedy: packed bfloat16 matmuls (where the CPU has them) and
    the screened argmax, which must pick the bfloat16 model's own argmax, ties included."""
    model, _ = toy
    bf16 = use_onednn(copy.deepcopy(model).to(torch.bfloat16))
    if screened_argmax(bf16) is None:
        pytest.skip("this PyTorch build has no int8 weight kernel")
    want = generate(bf16, *batch, max_new_tokens=14)
    kernels = [k for k, here in (("fbgemm", fbgemm_screen_available()), ("int8pack", int8pack_available())) if here]
    for kernel in kernels:  # each int8 kernel this build has
        argmax = ScreenedArgmax(bf16.shared.weight, bf16.final_logits_bias[0], bf16.logits, kernel)
        assert torch.equal(generate(bf16, *batch, max_new_tokens=14, argmax=argmax), want), kernel


def test_converted_model_registers_its_tensors_and_refuses_to_save_or_move(toy, tmp_path):
    """use_onednn swaps modules, patches nothing: state_dict keeps every name; what cannot work says so in one line."""
    from load_weights import save_model

    model, _ = toy
    fast = use_onednn(copy.deepcopy(model))
    if not isinstance(fast.decoder.layers[0].fc1, OneDNNLinear):
        pytest.skip("oneDNN is not available in this PyTorch build")
    assert list(fast.state_dict()) == list(model.state_dict())  # the packed weights are registered, same names
    assert sum(t.is_mkldnn for t in fast.state_dict().values()) == sum(
        isinstance(m, torch.nn.Linear) for m in model.modules())  # every Linear's weight, packed
    assert "logits" not in vars(fast)  # Pegasus.logits, not an instance attribute shadowing it
    with pytest.raises(ValueError, match=r"^cannot save a model with oneDNN-packed weights .* save it before"):
        save_model(fast, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything
    for move in (lambda m: m.to(torch.bfloat16), lambda m: m.to("meta"), lambda m: m.double()):
        with pytest.raises(ValueError, match="oneDNN-packed weights .* cannot change device or dtype"):
            move(fast)
    save_model(model, tmp_path / "plain")  # the unconverted model saves as before


def test_early_stopping_never_on_a_case_built_for_it():
    # K = 2, length_penalty 1 (score = sum log p / length), a scripted LM (toy.ScriptedLM), 10 steps.
    # Step 0: [EOS] .5 ends, ranked first: finished, -0.69/1 = -0.69. [2] .45 and [3] .05 run on.
    # Step 1: [2,EOS] .45*.9 ranks first and ends: finished, (-0.80 - 0.11)/2 = -0.45. Running:
    # [3,5] .05*.99 (log -3.01) and [2,4] .45*.1 (log -3.10).
    # early_stopping=False scores the best running beam at the current length, -3.01/2 = -1.5, below
    # the worst finished (-0.69): stop, answer [2,EOS]. "never" scores it at the length limit,
    # -3.01/10 = -0.30 > -0.69: go on. [3,5] then continues with probability 1 (the table's default)
    # until the limit ends it at length 10 with score -0.30, above -0.45: answer [3,5,5,...].
    table = {(): {1: .5, 2: .45, 3: .05}, (2,): {1: .9, 4: .1}, (3,): {1: .01, 5: .99}}
    options = dict(num_beams=2, length_penalty=1.0, max_new_tokens=10)
    assert run_scripted(ScriptedLM(table), **options) == [[0, 2, 1]]
    assert run_scripted(ScriptedLM(table), early_stopping="never", **options) == [[0, 3] + [5] * 9]


def test_kv_cache_reorder_moves_hypotheses_between_rows_and_refuses_to_overflow(toy, batch):
    """Beam search's reorder copies no row a parent keeps: its first child takes the row over, a further child
    takes the row of a hypothesis without children, which gets a copy of the parent's filled slots; decoding
    on from the reordered cache equals decoding the reordered prefixes from scratch, through a second reorder
    from the moved rows; a step past the cache's slots is refused."""
    model, _ = toy
    ids, mask = batch
    ids, mask = ids[:1], mask[:1]  # one document, three hypotheses (beams) of it
    with torch.inference_mode():
        enc = model.encode(ids, mask)
        cache = model.new_cache(enc, mask, n_hyps=3, max_len=4)
        prefix = torch.tensor([[0, 5, 6, 9], [0, 7, 8, 10], [0, 11, 12, 13]])  # (3, 4) decoder inputs
        for t in range(2):
            model.decode(prefix[:, t: t + 1], cache=cache, input_pos=torch.tensor([t]))
        layer = cache.self_kv[0]
        before = layer.k[:, :, :2].clone()
        cache.reorder(torch.tensor([2, 1, 1]))  # hypothesis 0 continues 2, hypotheses 1 and 2 continue 1
        # 2's first child (0) and 1's first child (1) keep rows 2 and 1; the further child of 1 takes row 0,
        # the row of old hypothesis 0, which has no child, and only that row is written
        assert cache.row_of.tolist() == [2, 1, 0]
        assert torch.equal(layer.k[:, :, :2], before[[1, 1, 2]])
        order = [2, 1, 1]
        model.decode(prefix[order, 2:3], cache=cache, input_pos=torch.tensor([2]))
        cache.reorder(torch.tensor([0, 0, 2]))  # from the moved rows: 0 and 1 continue (new) 0, 2 continues 2
        order = [order[0], order[0], order[2]]
        cached = model.logits(model.decode(prefix[order, 3:4], cache=cache, input_pos=torch.tensor([3])))[:, -1]
        again = model.logits(model.decode(prefix[order], enc.expand(3, -1, -1), mask.expand(3, -1)))[:, -1]
        assert torch.allclose(cached, again, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="past the decoder cache's 4 slots"):
            model.decode(prefix[:, :1], cache=cache, input_pos=torch.tensor([4]))


def test_a_padded_batchs_narrower_cross_keys_values_are_each_sources_own_length(toy, batch, monkeypatch):
    """Where decoding keeps keys/values in a narrower dtype (model.kv_dtype: int8 and bfloat16 models on the CPU),
    the decoder cache holds each source's cross-attention keys/values at its own length (pegasus.PerSource): no
    padding in memory, no mask, each source's hypotheses against its own keys. Forced here with float32 as the
    "narrower" dtype, so the arithmetic is the padded layout's up to rounding: the logits of every step and the
    beam search's ids are the same. float32 decoding itself keeps the padded batch (the reference's sums), and so
    does a batch without padding or left-padded."""
    import pegasus
    model, _ = toy
    ids, mask = batch  # 16 sources of 2..6 tokens, right-padded
    dec = torch.randint(2, TOY.vocab_size, (ids.size(0), 5), generator=torch.Generator().manual_seed(3))

    def cached_logits(ids, mask, hyps=2):  # teacher-forced through the cache, one step at a time
        with torch.inference_mode():
            cache = model.new_cache(model.encode(ids, mask), mask, hyps * ids.size(0), dec.size(1))
            steps = [model.logits(model.decode(dec[:, t: t + 1].repeat_interleave(hyps, 0), cache=cache,
                                               input_pos=torch.tensor([t]))) for t in range(dec.size(1))]
        return cache, torch.cat(steps, 1)  # (hyps * B, T, V)

    padded, ref = cached_logits(ids, mask)
    assert isinstance(padded.cross_kv[0], tuple) and padded.cross_mask is not None  # float32: the reference's layout
    expected = generate(model, ids, mask, num_beams=4, max_new_tokens=6)
    monkeypatch.setattr(model, "kv_dtype", torch.float32)
    cache, out = cached_logits(ids, mask)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and cache.cross_mask is None
    for pairs in cache.cross_kv:  # every layer: each source's (k, v), (1, H, S_i, Dh)
        assert isinstance(pairs, pegasus.PerSource)
        assert [(k.size(2), v.size(2), k.size(0)) for k, v in pairs] == [(n, n, 1) for n in lengths]
    first = cache.cross_kv[0][0][0]
    assert first.untyped_storage().nbytes() == len(model.decoder.layers) * 2 * sum(lengths) * TOY.d_model * 4
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()  # logits up to ~11: rounding
    assert torch.equal(generate(model, ids, mask, num_beams=4, max_new_tokens=6), expected)
    with pegasus.attention_mode(model, sdpa=False, keep_weights=True):  # the weights kept: one tensor per source
        cached_logits(ids, mask)
    weights = model.decoder.layers[0].encoder_attn.weights  # the last step's, (1, H, 2 hypotheses, S_i) each
    assert [w.shape[-1] for w in weights] == lengths and [w.shape[2] for w in weights] == [2] * len(lengths)
    assert all(torch.allclose(w.sum(-1), torch.ones(())) for w in weights)
    # The padded layout where there is no padding, or it is on the left (positions would not be a prefix).
    assert isinstance(cached_logits(ids[:, :2], mask[:, :2])[0].cross_kv[0], tuple)
    left = torch.stack([m.roll(int((m == 0).sum())) for m in mask])  # (B, S) the same lengths, padding first
    assert isinstance(cached_logits(ids, left)[0].cross_kv[0], tuple)


def test_the_heap_is_given_back_before_each_block_of_the_cache(toy, batch, monkeypatch):
    """Building the decoder cache (pegasus.DecoderCache) gives the heap's free pages back to the system
    (memory.give_back_freed_memory, glibc's malloc_trim(0)) once the encoder has run, and again once every
    layer's key/value projections are written into the cross-attention block, before the self-attention
    block is made (zeroed, where it is, all at once). Before each step it looks at the resident size and
    trims only where the process grew by more than the slack past its mark (memory.give_back_when_grown; a
    trim is ~2-3 ms): here a stand-in resident size grows by 40 MiB before the third step, and the trim that
    follows brings it back. The calls are recorded from a stand-in libc. What it saves in resident memory is
    measured by benchmarks/speed.py (README: Speed and memory)."""
    import ctypes

    import memory
    import pegasus
    model, _ = toy
    ids, mask = batch
    expected = generate(model, ids, mask, num_beams=2, max_new_tokens=4)
    events, resident = [], [100 << 20]

    class LibC:
        mallopt = staticmethod(lambda option, value: None)

        @staticmethod
        def malloc_trim(pad):
            events.append(f"malloc_trim({pad})")
            resident[0] = 100 << 20  # what the step had faulted back in is released

    def record(obj, method, name):
        real = getattr(obj, method)
        monkeypatch.setattr(obj, method, lambda *a, **kw: events.append(name) or real(*a, **kw))

    def step(*a, **kw):  # the second step's tensors land in 40 MiB of freed pages (the slack is 4)
        resident[0] += (40 << 20) * (events.count("decode") == 2)
        return events.append("decode") or real_decode(*a, **kw)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: LibC())
    monkeypatch.setattr(memory, "resident_bytes", lambda: resident[0])
    for method in ("encode", "new_cache"):
        record(model, method, method)
    real_decode = model.decode
    monkeypatch.setattr(model, "decode", step)
    for layer in model.decoder.layers:
        record(layer.encoder_attn, "project_kv", "project_kv")
    real_kv_cache = pegasus.KVCache
    monkeypatch.setattr(pegasus, "KVCache", lambda *a: events.append("KVCache") or real_kv_cache(*a))
    assert torch.equal(generate(model, ids, mask, num_beams=2, max_new_tokens=4), expected)
    L = len(model.decoder.layers)
    assert events == (["encode", "new_cache", "malloc_trim(0)"] + ["project_kv"] * L + ["malloc_trim(0)"]
                      + ["KVCache"] * (L + 1) + ["decode"] * 3 + ["malloc_trim(0)", "decode"])


def test_the_mark_takes_in_the_first_step_and_live_memory(monkeypatch):
    """memory.give_back_when_grown measures growth from a mark: where give_back_freed_memory left the process,
    raised at its second call to where the loop's first iteration took it (that iteration's working set, which
    a trim would only release for the next to fault in again), and raised again where a trim cannot bring the
    process back (live memory grew), so that the following steps do not trim again for nothing."""
    import memory
    trims, resident = [], [100 << 20]
    monkeypatch.setattr(memory, "_glibc", lambda: (None, trims.append))
    monkeypatch.setattr(memory, "resident_bytes", lambda: resident[0])
    memory.give_back_freed_memory()  # the mark: 100 MiB
    memory.give_back_when_grown(16 << 20)  # before the first step
    resident[0] += 20 << 20
    memory.give_back_when_grown(16 << 20)  # after it: the mark is now 120 MiB
    assert trims == [0]
    resident[0] += 16 << 20
    memory.give_back_when_grown(16 << 20)  # not more than the slack
    assert trims == [0]
    resident[0] += 1 << 20
    memory.give_back_when_grown(16 << 20)  # more: a trim, which releases nothing here
    assert trims == [0, 0]
    memory.give_back_when_grown(16 << 20)  # the mark is now 137 MiB
    assert trims == [0, 0]


def test_beam_search_log_softmax_is_the_reference_kernel_in_place():
    """Beam search normalizes the logits in place (decoding.log_softmax_): the same values as the
    reference's F.log_softmax, bit for bit, -inf included, and no second (N, V) tensor."""
    import torch.nn.functional as F

    from decoding import log_softmax_
    x = torch.randn(32, 5000, generator=torch.Generator().manual_seed(0)) * 7
    x[:, 3] = -float("inf")
    y = x.clone()
    out = log_softmax_(y)
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, F.log_softmax(x, dim=-1))
