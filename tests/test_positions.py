"""The two sinusoid formulas: the reference library's (default) and the original TF code's.

The expected tables are transcribed here with numpy straight from the two sources, not from pegasus.py:
  original  pegasus/layers/timing.py: N = D // 2, log_time_incr = log(1e4 / 1) / max(N - 1, 1),
            inv_scale = exp(range(N) * -log_time_incr), signal = concat([sin(p*inv), cos(p*inv)])
  reference the reference's PEGASUS port: inv_freq = 1 / 10000^(2i / D), the same [sin | cos] layout.
"""

import math

import numpy as np
import pytest
import torch

from pegasus import Pegasus, PegasusConfig, sinusoids
from pegasus_x import sinusoids_x


def tf_timing_signal(n_positions: int, d: int, dtype=np.float64) -> np.ndarray:
    n = d // 2
    log_time_incr = math.log(1.0e4 / 1.0) / max(n - 1, 1)
    inv_scale = np.exp(np.arange(n).astype(dtype) * dtype(-log_time_incr)).astype(dtype)
    time = np.arange(n_positions).astype(dtype)[:, None] * inv_scale[None, :]
    return np.concatenate([np.sin(time), np.cos(time)], axis=1)


def reference_table(n_positions: int, d: int) -> np.ndarray:
    inv_freq = 1.0 / 10000.0 ** (2 * np.arange(d // 2) / d)
    time = np.arange(n_positions)[:, None] * inv_freq[None, :]
    return np.concatenate([np.sin(time), np.cos(time)], axis=1)


@pytest.mark.parametrize("d", [8, 16, 1024])
def test_original_positions_are_the_tf_formula(d):
    table = sinusoids(1024, d, "original").double().numpy()
    np.testing.assert_allclose(table, tf_timing_signal(1024, d), rtol=0, atol=1e-7)  # float32 rounding only
    # What TF itself computed, in float32 arithmetic: within 2e-4 (its own rounding at large positions).
    np.testing.assert_allclose(table, tf_timing_signal(1024, d, np.float32), rtol=0, atol=2e-4)
    # The default is still the reference's, and the two differ.
    np.testing.assert_allclose(sinusoids(1024, d).double().numpy(), reference_table(1024, d), rtol=0, atol=1e-7)
    assert np.abs(tf_timing_signal(1024, d) - reference_table(1024, d)).max() > 0.1


def test_the_model_uses_the_configured_formula():
    cfg = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128)
    default, original = Pegasus(PegasusConfig(**cfg)), Pegasus(PegasusConfig(**cfg, position_formula="original"))
    pos = torch.arange(128)
    np.testing.assert_allclose(default.positions(pos).double().numpy(), reference_table(128, 16), atol=1e-7)
    np.testing.assert_allclose(original.positions(pos).double().numpy(), tf_timing_signal(128, 16), atol=1e-7)
    assert PegasusConfig.from_dict({"position_formula": "original"}).position_formula == "original"
    with pytest.raises(ValueError, match="unknown position formula 'tf'"):
        sinusoids(8, 8, "tf")


def test_pegasus_x_already_uses_the_original_spacing():
    np.testing.assert_allclose(sinusoids_x(torch.arange(1024), 1024, torch.float32).double().numpy(),
                               tf_timing_signal(1024, 1024, np.float32), rtol=0, atol=2e-4)


def test_phase_error_figures_quoted_in_the_docs():
    # Largest phase difference p * |w_i - w'_i| between the two spacings at d_model 1024 (N = 512).
    i = np.arange(512)
    gap = np.abs(10000.0 ** (-2 * i / 1024) - 10000.0 ** (-i / 511))
    assert int(gap.argmax()) == 56
    assert round(64 * gap.max(), 3) == 0.046 and round(512 * gap.max(), 2) == 0.37
    assert round(1024 * gap.max(), 2) == 0.74
