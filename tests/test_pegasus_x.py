"""PEGASUS-X against the reference implementation (transformers' PegasusXForConditionalGeneration).

The models are random, but *every* tensor is random, including the ones that start as constants
(LayerNorms, FFN biases) and the global-token embeddings, so that a dropped, misnamed or misused
tensor changes the logits. The shapes cover block sizes and global-token counts that are not the
published ones, inputs that are not a multiple of the block size, padded batches (whole blocks of
padding too), staggering on and off, and (marked slow) the full google/pegasus-x-base shape.
Run with `-s` to see the measured differences.
"""

import os
from dataclasses import asdict, fields

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from toy import TOY, relative_error, texts, to_reference, toy_inputs, train_toy

from pegasus import Pegasus, PegasusConfig, attention_mode
from pegasus_x import PUBLISHED, PegasusX, PegasusXConfig, sinusoids_x

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=1000, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=1024)


def random_pair(cfg: dict, seed: int = 0):
    """(ours, reference) with the same weights, all of them random."""
    torch.manual_seed(seed)
    ours = PegasusX(PegasusXConfig(**cfg)).eval()
    # The usual init (std 0.02) makes every residual branch ~100x smaller than the stream it adds to, which would
    # hide most mistakes under the tolerance; unit-gain weights let each part of the model count.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name == "shared.weight":  # scaled by sqrt(d_model): token vectors as large as the positions
                p.normal_(0.0, p.size(1) ** -0.5)
            elif "embed_global" in name:
                p.normal_(0.0, 1.0)
            else:  # projection matrices: unit gain
                p.normal_(0.0, p.size(1) ** -0.5)
    return ours, to_reference(ours)  # to_reference fails on any parameter the reference does not have, or lacks


def random_inputs(vocab: int, lengths: list[int], dec_len: int = 7, seed: int = 0):
    """Right-padded random ids (pad = 0 where masked), their mask, and decoder ids starting with the start token."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, S)
    ids = torch.randint(2, vocab, (len(lengths), S), generator=g) * mask  # (B, S)
    dec = torch.randint(2, vocab, (len(lengths), dec_len), generator=g)  # (B, T)
    dec[:, 0] = 0
    return ids, mask, dec


def check_parity(cfg: dict, lengths: list[int], name: str):
    ours, ref = random_pair(cfg)
    ids, mask, dec = random_inputs(cfg["vocab_size"], lengths)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        rel_sdpa = relative_error(ours(ids, mask, dec), expected)
        with attention_mode(ours, sdpa=False):
            rel_math = relative_error(ours(ids, mask, dec), expected)
    print(f"\n{name}: relative max |dlogit| sdpa {rel_sdpa:.1e}, math {rel_math:.1e}")


# ----------------------------------------------------------------------------- logits parity

SHAPES = {  # name: (config overrides, lengths of the rows in the batch)
    "block8-globals3-stagger-padded": (dict(block_size=8, num_global_tokens=3), [29, 13]),
    "block8-globals3-no-stagger": (dict(block_size=8, num_global_tokens=3, stagger_local_blocks=False), [29, 13]),
    "block6-globals1-padding-blocks": (dict(block_size=6, num_global_tokens=1), [37, 20, 5]),
    "block5-odd-no-stagger": (dict(block_size=5, num_global_tokens=2, stagger_local_blocks=False), [23, 11]),
    "shorter-than-a-block": (dict(block_size=16, num_global_tokens=5), [5]),
    "exact-multiple-4-layers": (dict(block_size=16, num_global_tokens=2, encoder_layers=4), [32, 32]),
}


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_reference(name):
    overrides, lengths = SHAPES[name]
    check_parity({**SMALL, **overrides}, lengths, name)


def test_logits_match_reference_mid_size():
    """A mid-size model on a padded batch of 700 and 411 tokens (blocks of 64, 16 globals, full vocabulary)."""
    cfg = dict(vocab_size=96103, d_model=128, encoder_layers=4, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=16384,
               block_size=64, num_global_tokens=16)
    check_parity(cfg, [700, 411], "mid-size")


@pytest.mark.slow
def test_logits_match_reference_full_base_shape():
    """google/pegasus-x-base (272M parameters, blocks of 512, 128 globals) on a 2,100-token input."""
    cfg = asdict(PUBLISHED["google/pegasus-x-base"])
    cfg.pop("model_type")
    check_parity(cfg, [2100], "pegasus-x-base shape, 2,100 tokens")


def test_padding_does_not_change_a_row():
    """A row's logits are the same alone and in a padded batch (the padding is masked everywhere)."""
    ours, _ = random_pair({**SMALL, "block_size": 6, "num_global_tokens": 2})
    ids, mask, dec = random_inputs(SMALL["vocab_size"], [40, 9])
    with torch.no_grad():
        batch = ours(ids, mask, dec)
        alone = ours(ids[1:, :9], None, dec[1:])
    assert torch.allclose(batch[1], alone[0], atol=1e-5, rtol=0)


def test_cached_decoding_matches_teacher_forcing():
    """Step-by-step decoding with the KV cache (positions computed per step) equals one causal pass."""
    ours, _ = random_pair({**SMALL, "block_size": 4, "num_global_tokens": 2})
    ids, mask, dec = random_inputs(SMALL["vocab_size"], [10, 6], dec_len=6)
    with torch.no_grad():
        enc = ours.encode(ids, mask)
        full = ours.logits(ours.decode(dec, enc, mask))
        cache = ours.new_cache(enc, mask, n_hyps=2, max_len=8)
        steps = [ours.logits(ours.decode(dec[:, t: t + 1], cache=cache, input_pos=torch.tensor([t]))) for t in range(6)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_load_model_and_save_model(tmp_path):
    """Checkpoints in the reference's layout load through load_weights (float16 refused), and save back."""
    from load_weights import load_model, save_model

    ours, ref = random_pair({**SMALL, "block_size": 8, "num_global_tokens": 3})
    ref.save_pretrained(tmp_path / "ref")
    loaded, _ = load_model(tmp_path / "ref", with_tokenizer=False)
    assert isinstance(loaded, PegasusX) and loaded.config.block_size == 8 and loaded.config.num_global_tokens == 3
    ids, mask, dec = random_inputs(SMALL["vocab_size"], [29, 13])
    with torch.no_grad():
        logits = ours(ids, mask, dec)
        assert torch.equal(loaded(ids, mask, dec), logits)
        save_model(ours, tmp_path / "ours")
        back = transformers.PegasusXForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
        relative_error(logits, back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    with pytest.raises(ValueError, match="PEGASUS-X does not support float16"):
        load_model(tmp_path / "ref", dtype="float16", with_tokenizer=False)


# ----------------------------------------------------------------------------- positions


def test_sinusoids_match_reference_bit_for_bit():
    """Same numbers as the reference in float32 and bfloat16 (computed in the model dtype), at every position."""
    module = transformers.models.pegasus_x.modeling_pegasus_x.PegasusXSinusoidalPositionalEmbedding
    for dtype in (torch.float32, torch.bfloat16):
        for dim in (768, 1024, 32):
            ref = module(dim)(torch.zeros(1, 16384, dim, dtype=dtype))[0]
            assert torch.equal(sinusoids_x(torch.arange(16384), dim, dtype), ref), (dtype, dim)
    # by hand, dim 8: frequencies 10000^(-i/3), sines first, then cosines
    angles = torch.tensor([[p * 10000 ** (-i / 3) for i in range(4)] for p in range(5)], dtype=torch.float64)
    expected = torch.cat([angles.sin(), angles.cos()], 1).float()
    assert torch.allclose(sinusoids_x(torch.arange(5), 8, torch.float32), expected, atol=1e-6)


def test_sinusoids_differ_from_pegasus():
    """The formulas are close but not interchangeable: confusing them would silently shift positions."""
    from pegasus import sinusoids
    assert (sinusoids(1024, 768) - sinusoids_x(torch.arange(1024), 768, torch.float32)).abs().max() > 0.5


# ----------------------------------------------------------------------------- linear memory


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (every aten op, inside SDPA too)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_encoder_tensor(model, length: int) -> int:
    ids = torch.randint(2, 100, (1, length))
    with torch.no_grad(), LargestTensor() as probe:
        model.encode(ids, torch.ones_like(ids))
    return probe.numel


@pytest.mark.parametrize("sdpa", [True, False])
def test_encoder_memory_is_linear(sdpa):
    """4x the input gives at most ~4x the largest intermediate tensor; full attention (the control) gives ~16x."""
    kw = dict(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=4096)
    ours = PegasusX(PegasusXConfig(**kw, block_size=32, num_global_tokens=4)).eval()
    full = Pegasus(PegasusConfig(**kw)).eval()
    with attention_mode(ours, sdpa=sdpa), attention_mode(full, sdpa=False):  # the math path shows its (T x T) scores
        ratio = largest_encoder_tensor(ours, 4000) / largest_encoder_tensor(ours, 1000)
        control = largest_encoder_tensor(full, 4000) / largest_encoder_tensor(full, 1000)
    assert ratio < 4.5, f"largest encoder tensor grew {ratio:.1f}x for 4x the input"
    assert control > 12, f"the full-attention control grew only {control:.1f}x; the probe is not measuring attention"


def test_attention_scores_are_blocked():
    """The math path's weights: (B, N, H, block, G + block) per token, (B, H, G, G + S) per global, where the
    staggered layer has one block more (half a block of padding in front) and each row sums to 1."""
    cfg = {**SMALL, "block_size": 8, "num_global_tokens": 3}
    ours, _ = random_pair(cfg)
    ids, mask, _ = random_inputs(SMALL["vocab_size"], [37, 20])  # 37 tokens -> 40 = 5 blocks of 8
    with torch.no_grad(), attention_mode(ours, sdpa=False, keep_weights=True):
        ours.encode(ids, mask)
    plain, staggered = (layer.self_attn.weights for layer in ours.encoder.layers[:2])
    assert plain["local"].shape == (2, 5, 4, 8, 3 + 8) and plain["global"].shape == (2, 4, 3, 3 + 37)
    assert staggered["local"].shape == (2, 6, 4, 8, 3 + 8) and staggered["global"].shape == (2, 4, 3, 3 + 37)
    assert torch.allclose(plain["local"].sum(-1), torch.ones(2, 5, 4, 8))
    # Row 1 has 20 real tokens: in the unstaggered layer, block 2 holds tokens 16..23, of which 16..19 are real.
    assert (plain["local"][1, 2, :, :, 3 + 4:] == 0).all() and (plain["local"][1, 2, :, :, 3:3 + 4] > 0).all()
    # In the staggered layer, block 0 holds 4 padding slots, then tokens 0..3.
    assert (staggered["local"][0, 0, :, :, 3:3 + 4] == 0).all() and (staggered["local"][0, 0, :, :, 3 + 4:] > 0).all()


# ----------------------------------------------------------------------------- dtypes


def test_float16_is_refused_unless_forced():
    ours, _ = random_pair(SMALL)
    ids, mask, dec = random_inputs(SMALL["vocab_size"], [12, 7])
    ours.half()
    with pytest.raises(ValueError, match="PEGASUS-X does not support float16"):
        ours(ids, mask, dec)
    PegasusX.check_dtype(torch.float16, force=True)  # no error
    PegasusX.check_dtype(torch.bfloat16)
    ours.allow_fp16 = True  # this model only
    with torch.no_grad():
        assert torch.isfinite(ours(ids, mask, dec)).all()
    with pytest.raises(ValueError, match="float16"):
        PegasusX.check_dtype(torch.float16)  # the class default is unchanged


def test_bfloat16_tracks_the_reference():
    """bfloat16 runs, and its logits are about as far from float32 as the reference's bfloat16 logits are."""
    cfg = {**SMALL, "block_size": 8, "num_global_tokens": 3}
    ours, ref = random_pair(cfg)
    ids, mask, dec = random_inputs(SMALL["vocab_size"], [29, 13])
    with torch.no_grad():
        exact = ours(ids, mask, dec)
        ours_bf16 = ours.to(torch.bfloat16)(ids, mask, dec).float()
        ref_bf16 = ref.to(torch.bfloat16)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
    scale = exact.abs().max()
    ours_err = ((ours_bf16 - exact).abs().max() / scale).item()
    ref_err = ((ref_bf16 - exact).abs().max() / scale).item()
    between = ((ours_bf16 - ref_bf16).abs().max() / scale).item()
    print(f"\nbfloat16 relative max |dlogit| vs float32: ours {ours_err:.1e}, reference {ref_err:.1e}; "
          f"ours vs reference {between:.1e}")
    assert ours_err < max(2 * ref_err, 2e-2) and between < 5e-2


# ----------------------------------------------------------------------------- config and errors


def test_published_configs(published_configs):
    for name, cfg in PUBLISHED.items():
        published = published_configs[name]
        for f in fields(PegasusXConfig):
            if f.name in published:
                assert getattr(cfg, f.name) == published[f.name], (name, f.name)
        assert PegasusXConfig.from_dict(published) == cfg
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in PegasusX(cfg).parameters()) for name, cfg in PUBLISHED.items()}
    assert round(counts["google/pegasus-x-base"] / 1e6) == 272 and round(counts["google/pegasus-x-large"] / 1e6) == 569


def test_parameter_names_are_the_checkpoint_names():
    """Each reference tensor is ours with "model." dropped (bar the tied copies), and back; no final_logits_bias."""
    ours, ref = random_pair(SMALL)
    tied = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    assert {k.removeprefix("model.") for k in ref.state_dict() if k not in tied} == set(ours.state_dict())
    assert "final_logits_bias" not in ours.state_dict() and "encoder.embed_global.weight" in ours.state_dict()
    assert "encoder.layers.1.global_self_attn_layer_norm.weight" in ours.state_dict()


def test_bad_configs_and_inputs_are_reported():
    with pytest.raises(ValueError, match="block_size must be a positive even number"):
        PegasusX(PegasusXConfig(**SMALL, block_size=7))
    with pytest.raises(ValueError, match="num_global_tokens must be >= 1"):
        PegasusX(PegasusXConfig(**SMALL, num_global_tokens=0))
    model = PegasusX(PegasusXConfig(**{**SMALL, "max_position_embeddings": 16}, block_size=4)).eval()
    with pytest.raises(ValueError, match="input of 17 tokens is longer than max_position_embeddings=16"):
        model.encode(torch.ones(1, 17, dtype=torch.long))


# ----------------------------------------------------------------------------- a decoder row with no key


def test_fully_masked_decoder_row_matches_reference():
    """The published pegasus-x-base expectations pass decoder_attention_mask = the encoder mask, whose first position
    is masked: decoder position 0 then has no key it may attend to."""
    ours, ref = random_pair(SMALL)
    ids = torch.tensor([[0, 31, 232, 328, 740, 140, 125, 69, 460, 158, 2]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=mask).logits
        logits = ours(ids, mask, ids, mask)
        relative_error(logits[:, 1:], expected[:, 1:])  # the other positions agree
        relative_error(logits, expected)  # position 0 too: both attend uniformly there (see Pegasus.decode)


# ----------------------------------------------------------------------------- generation on a trained model

TOY_X = dict(TOY, block_size=4, num_global_tokens=2)


@pytest.fixture(scope="module")
def trained():
    """A tiny PEGASUS-X trained on the toy copy/reverse task (tests/toy.py), and its reference twin. Blocks of 4
    with 2 globals: the 3..7-token inputs span 1 or 2 blocks, and up to 3 in the staggered layer. (It learns
    more slowly than PEGASUS at the same size; 1e-3 is a learning rate at which it reliably does.)"""
    torch.manual_seed(0)
    model = train_toy(PegasusX(PegasusXConfig(**TOY_X)), lr=1e-3)
    assert model.last_toy_loss < 0.6, f"the toy model did not learn (loss {model.last_toy_loss:.2f})"
    return model, to_reference(model)


def run_generate(model, num_beams, length_penalty, argmax=None):
    generate = pytest.importorskip("generate").generate
    ids, mask = toy_inputs(12, model.config)
    return generate(model, ids, mask, max_new_tokens=14, num_beams=num_beams, length_penalty=length_penalty,
                    argmax=argmax)


@pytest.mark.parametrize("num_beams, length_penalty", [(1, 1.0), (4, 1.0), (4, 0.0)])
def test_generate_matches_reference(trained, num_beams, length_penalty):
    model, ref = trained
    ours = run_generate(model, num_beams, length_penalty)
    ids, mask = toy_inputs(12, model.config)
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, num_beams=num_beams,
                                length_penalty=length_penalty, do_sample=False)
    assert torch.equal(ours, expected)
    assert all(t[-1] == model.config.eos_token_id for t in texts(ours)), "every output should end: it is trained"


@pytest.mark.parametrize("num_beams", [1, 4])
def test_onednn_path_generates_the_same_ids(trained, num_beams):
    """What the CLI runs for float32 on CPU: packed matmuls, and the screened argmax when greedy."""
    import copy

    from onednn import OneDNNLinear, use_onednn
    from screen import screened_argmax
    model, _ = trained
    fast = use_onednn(copy.deepcopy(model))
    argmax = screened_argmax(fast)
    if argmax is None or not isinstance(fast.decoder.layers[0].fc1, OneDNNLinear):
        pytest.skip("this PyTorch build has no oneDNN / int8 weight kernels")
    assert torch.equal(run_generate(fast, num_beams, 1.0, argmax), run_generate(model, num_beams, 1.0))


def test_greedy_and_beam_search_disagree_on_the_toy_task(trained):
    """The test above would be weak if greedy and beam search found the same outputs: check they do not."""
    model, _ = trained
    greedy = texts(run_generate(model, 1, 1.0))
    # Without length normalisation beams find the (longer) copies more often. The counts depend on the
    # training (measured: 8 of 12 at lp 1, 11-12 of 12 at lp 0); what matters is that neither is zero.
    for length_penalty, at_least in ((1.0, 1), (0.0, 3)):
        beam = texts(run_generate(model, 4, length_penalty))
        assert sum(g != b for g, b in zip(greedy, beam)) >= at_least, length_penalty


# ----------------------------------------------------------------------------- the real checkpoint (opt-in)

BASE_DIR = os.environ.get("PEGASUS_X_BASE_DIR")


@pytest.mark.skipif(not BASE_DIR, reason="set PEGASUS_X_BASE_DIR to a local google/pegasus-x-base checkpoint")
def test_pegasus_x_base_published_outputs():
    """The reference library's integration-test expectations (../shared/reference/expected_outputs.md), fp32, 1e-4."""
    from load_weights import load_model

    model, _ = load_model(BASE_DIR, with_tokenizer=False)
    assert isinstance(model, PegasusX), "PEGASUS_X_BASE_DIR does not hold a pegasus_x checkpoint"
    ids = torch.tensor([[0, 31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588, 2]])
    mask = (ids != 0).long()  # the leading 0 is masked, and the reference passes this as the decoder mask too
    hidden = []
    hook = model.decoder.layer_norm.register_forward_hook(lambda m, i, out: hidden.append(out))
    with torch.no_grad():
        model(ids, mask, torch.tensor([[2, 0, 31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588]]), mask)
        logits = model(ids, mask, ids, mask)
    hook.remove()
    assert hidden[0].shape == (1, 11, 768) and logits.shape == (1, 11, 96103)
    expected_hidden = torch.tensor([[0.0702, -0.1552, 0.1192], [0.0836, -0.1848, 0.1304], [0.0673, -0.1686, 0.1045]])
    expected_logits = torch.tensor([[0.0, 9.5705185, 1.5897303], [0.0, 9.833374, 1.5828674],
                                    [0.0, 10.429961, 1.5643371]])
    assert torch.allclose(hidden[0][0, :3, :3], expected_hidden, atol=1e-4)
    assert torch.allclose(logits[0, :3, :3], expected_logits, atol=1e-4)
