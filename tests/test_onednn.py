"""onednn.py: the packed-weight matmuls.

(tests/test_generate.py checks that a model under use_onednn decodes the same tokens, and how it
saves and moves; tests/test_screen.py checks the screened greedy argmax.)
"""

import pytest
import torch

from onednn import OneDNNLinear, available

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch build has no oneDNN")


def test_packed_linear_matches_plain_linear_and_is_row_independent():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    x = torch.randn(2, 5, 96, generator=g)
    fast = OneDNNLinear(lin.weight, lin.bias)
    torch.testing.assert_close(fast(x), lin(x), rtol=0, atol=1e-5)
    # A row's result does not depend on the rows computed with it (1 hypothesis or 8 beams).
    assert torch.equal(fast(x[:1, :1]), fast(x)[:1, :1])
