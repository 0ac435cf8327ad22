"""onednn.py: the packed-weight matmuls and the screened greedy argmax.

The screened argmax claims to be exact: its bound must hold for every token, and its answer must
be the argmax of the full float32 logits, including ties, banned tokens and a forced token.
(tests/test_generate.py checks that a model under use_onednn decodes the same tokens, and how it
saves and moves.)
"""

import pytest
import torch

from onednn import OneDNNLinear, ScreenedArgmax, available

pytestmark = pytest.mark.skipif(not available() or not hasattr(torch, "_weight_int8pack_mm"),
                                reason="this PyTorch build has no oneDNN / int8 weight kernels")


def embedding(V: int, D: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different scales (as trained embeddings have), one all zero, two identical, one
    exactly representable in int8."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, D, generator=g) * 0.02 * torch.rand(V, 1, generator=g).mul(8).exp2()
    E[3] = 0.0
    E[11] = torch.randint(-127, 128, (D,), generator=g) * 2.0**-10  # exactly on the int8 grid: no int8 error
    E[11, 0] = 127 * 2.0**-10
    E[7] = E[V - 1] = 5 * E.norm(dim=1).max() * torch.nn.functional.normalize(E[7], dim=0)  # the longest rows, equal
    return E


def test_packed_linear_matches_plain_linear_and_is_row_independent():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    x = torch.randn(2, 5, 96, generator=g)
    fast = OneDNNLinear(lin.weight, lin.bias)
    torch.testing.assert_close(fast(x), lin(x), rtol=0, atol=1e-5)
    # A row's result does not depend on the rows computed with it (1 hypothesis or 8 beams).
    assert torch.equal(fast(x[:1, :1]), fast(x)[:1, :1])


@pytest.mark.parametrize("V,D", [(96103, 1024), (500, 64)])  # the pegasus-xsum head, and a small one
def test_bound_holds_for_every_token(V, D):
    E = embedding(V, D)
    bias = torch.randn(V) * 0.1
    head = ScreenedArgmax(E, bias, lambda h: h @ E.T + bias)
    g = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 30.0):  # final LayerNorm outputs of very different sizes
        h = torch.randn(8, D, generator=g) * scale
        y, bound = head.approximate(h)
        exact = h.double() @ E.double().T + bias.double()  # (8, V) in float64
        slack = bound.double() - (exact - y.double()).abs()
        assert slack.min() >= 0, f"bound violated by {-slack.min():.3g} at scale {scale}"
        # Cauchy-Schwarz is tight when h points along a row's int8 error: the worst case, for 20 rows.
        rows = torch.randint(0, V, (20,), generator=g)
        err = E[rows] - head.q[rows].float() * head.scale[rows].float()[:, None]  # (20, D)
        h_bad = torch.nn.functional.normalize(err, dim=1) * scale * D**0.5
        y_bad, bound_bad = head.approximate(h_bad)
        exact_bad = h_bad.double() @ E.double().T + bias.double()
        i = torch.arange(20)
        assert (bound_bad.double() - (exact_bad - y_bad.double()).abs())[i, rows].min() >= 0
        # No int8 error and h exact in bfloat16: only the kernel's own rounding is left to bound.
        h_grid = E[11:12] * 64
        y_grid, bound_grid = head.approximate(h_grid)
        miss = (h_grid.double() @ E[11].double() + bias[11].double() - y_grid[0, 11].double()).abs()
        assert 0 < miss <= bound_grid[0, 11]
        # ... and tight enough to be worth it: few tokens survive the screening.
        best_low = (y - bound).max(1, keepdim=True).values
        assert ((y + bound) >= best_low).sum(1).max() < V // 20


def test_argmax_equals_the_full_argmax_with_ties_bans_and_forced_tokens():
    V, D = 5000, 128
    E, bias = embedding(V, D), torch.zeros(V)
    head = ScreenedArgmax(E, bias, lambda h: h @ E.T + bias)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, D, generator=g)
    h[0] = E[7]  # tokens 7 and V-1 tie for the highest logit: the lower id wins, as in argmax
    full = h @ E.T + bias
    assert torch.equal(head(h, lambda s: s), full.argmax(-1))
    assert head(h[:1], lambda s: s).item() == 7
    winners = full.argmax(-1)

    def ban_winners(s):  # as min-length / n-gram blocking do
        s[torch.arange(len(s)), winners] = -float("inf")
        return s
    banned = full.clone()
    banned[torch.arange(64), winners] = -float("inf")
    assert torch.equal(head(h, ban_winners), banned.argmax(-1))
    assert not torch.equal(banned.argmax(-1), winners)

    def force_42(s):  # as forced EOS does at the last step
        s.fill_(-float("inf"))
        s[:, 42] = 0.0
        return s
    assert head(h, force_42).tolist() == [42] * 64

    def ban_0(s):
        s[:, 0] = -float("inf")
        return s
    # h = 0: every token ties, so screening cannot narrow anything down (the fallback scores all exactly).
    assert head(torch.zeros(2, D), ban_0).tolist() == [1, 1]


def test_near_ties_are_resolved_exactly():
    """Pairs of almost equal rows: the int8 scores cannot tell them apart, the rescoring must."""
    V, D = 4000, 256
    E = embedding(V, D)
    g = torch.Generator().manual_seed(3)
    # 1% apart: far above float32 rounding (so the float32 answer is not itself a tie), far below int8's.
    E[1::2] = E[0::2] + 1e-2 * E[0::2].abs().mean() * torch.randn(V // 2, D, generator=g)
    head = ScreenedArgmax(E, None, lambda h: h @ E.T)
    h = torch.randn(512, D, generator=g)
    full = (h @ E.T).argmax(-1)
    assert torch.equal(full, (h.double() @ E.double().T).argmax(-1))
    y, _ = head.approximate(h)
    assert (y.argmax(-1) != full).sum() > 100  # the approximation alone picks the wrong twin
    assert torch.equal(head(h, lambda s: s), full)


def test_bfloat16_logits_with_their_ties():
    """A bfloat16 model's logits are rounded to bfloat16 (8 significant bits), so the best score is often
    shared by several tokens: the screened argmax must return the model's own argmax, the lowest tied
    id, not the token whose unrounded score is highest."""
    V, D = 20000, 256
    g = torch.Generator().manual_seed(4)
    E = (torch.randn(V, D, generator=g) * 0.05).bfloat16()  # rows of one size: close top scores
    bias = (torch.randn(V, generator=g) * 0.1).bfloat16()
    logits = lambda h: (h @ E.T) + bias  # as Pegasus.logits computes them in bfloat16  # noqa: E731
    head = ScreenedArgmax(E, bias, logits)
    h = torch.randn(2048, D, generator=g).bfloat16()
    full = logits(h).float()
    unrounded = (h.float() @ E.float().T + bias.float()).argmax(-1)
    assert (unrounded != full.argmax(-1)).sum() > 5, "no rounding ties: the test would not test them"
    # 8 rows a call, as greedy decoding's batches: all 2,048 at once would have too many candidates in
    # all and take the fallback (the full logits).
    assert torch.equal(torch.cat([head(rows, lambda s: s) for rows in h.split(8)]), full.argmax(-1))
    y, bound = head.approximate(h)
    assert (bound - (full - y).abs()).min() >= 0  # the bound holds for the rounded logits themselves
