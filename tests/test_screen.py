"""screen.py: the screened greedy argmax, with each int8 kernel this machine has.

It claims to be exact: its bound must hold for every token, and its answer must be the argmax of
the full logits, including ties, banned tokens and a forced token. (tests/test_generate.py checks
that greedy decoding with it gives the model's own tokens.)
"""

import pytest
import torch

import screen
from screen import ScreenedArgmax, fbgemm_screen_available, int8pack_available

KERNELS = [pytest.param("fbgemm", marks=pytest.mark.skipif(not fbgemm_screen_available(),
                                                           reason="no fbgemm (or its float-output int8 linear) here")),
           pytest.param("int8pack", marks=pytest.mark.skipif(not int8pack_available(),
                                                             reason="no torch._weight_int8pack_mm in this build"))]


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


def int8_rows(E: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e~: the rows as the int8 table holds them, by the documented rule (round to the row's scale)."""
    s = scale.float()[:, None]
    return torch.round(E / s).clamp(-127, 127) * s


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("V,D", [(96103, 1024), (500, 64)])  # the pegasus-xsum head, and a small one
def test_bound_holds_for_every_token(V, D, kernel):
    E = embedding(V, D)
    bias = torch.randn(V) * 0.1
    head = ScreenedArgmax(E, bias, lambda h: h @ E.T + bias, kernel)
    g = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 30.0):  # final LayerNorm outputs of very different sizes
        h = torch.randn(8, D, generator=g) * scale
        h[0, 0] *= 40  # one outlier coordinate: it sets fbgemm's grid for the whole call
        y, bound = head.approximate(h)
        exact = h.double() @ E.double().T + bias.double()  # (8, V) in float64
        slack = bound.double() - (exact - y.double()).abs()
        assert slack.min() >= 0, f"bound violated by {-slack.min():.3g} at scale {scale}"
        # Cauchy-Schwarz is tight when h points along a row's int8 error: the worst case, for 20 rows.
        rows = torch.randint(0, V, (20,), generator=g)
        err = E[rows] - int8_rows(E[rows], head.scale[rows])  # (20, D)
        h_bad = torch.nn.functional.normalize(err, dim=1) * scale * D**0.5
        y_bad, bound_bad = head.approximate(h_bad)
        exact_bad = h_bad.double() @ E.double().T + bias.double()
        i = torch.arange(20)
        assert (bound_bad.double() - (exact_bad - y_bad.double()).abs())[i, rows].min() >= 0
        # No int8 error and h exact on the kernel's grid: only the kernel's own rounding is left to bound.
        h_grid = E[11:12] * 64
        y_grid, bound_grid = head.approximate(h_grid)
        miss = (h_grid.double() @ E[11].double() + bias[11].double() - y_grid[0, 11].double()).abs()
        assert miss <= bound_grid[0, 11]
        if kernel == "int8pack":  # its output is rounded to bfloat16: a miss to bound
            assert miss > 0
        # ... and tight enough to be worth it: few tokens survive the screening.
        best_low = (y - bound).max(1, keepdim=True).values
        assert ((y + bound) >= best_low).sum(1).max() < V // 20


@pytest.mark.skipif(not fbgemm_screen_available(), reason="no fbgemm (or its float-output int8 linear) here")
@pytest.mark.parametrize("seven_bits", [False, True])  # True: the 7-bit activations of CPUs without VNNI
def test_fbgemm_sees_h_on_an_exact_grid(monkeypatch, seven_bits):
    """fbgemm quantizes its input to uint8; fed as two rows on a power-of-two grid, its quantization is
    exact, so its scores are the float64 product of h~ (within s / 2F of h) and the int8 rows, to
    float32 rounding. A kernel that rounded the input its own way would miss by far more."""
    monkeypatch.setattr(screen, "fbgemm_reduce_range", lambda: seven_bits)
    V, D = 3000, 256
    E = embedding(V, D)
    head = ScreenedArgmax(E, None, lambda h: h @ E.T, "fbgemm")
    head.prepare()
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, D, generator=g) * torch.tensor([[0.01], [1.0], [3.0], [100.0]])  # rows of different sizes
    h[1, 7] = -25.0  # and an outlier
    y, h_used = head.fbgemm_scores(h)
    top = 63 if seven_bits else 127
    largest = h.abs().amax(1, keepdim=True).double()
    grid = 2.0 ** torch.ceil(torch.log2(largest / top))  # (4, 1) each row's s, the power of two just above
    assert ((h - h_used).abs().double() <= grid / (2 * (top + 1))).all()  # within s / 2F in every coordinate
    # s < 2 max|h_j| / top, so that is below max|h_j| / (top F): 2^-14 of it (2^-12 with 7 bits)
    assert ((h - h_used).abs().amax(1, keepdim=True) <= largest / (top * (top + 1))).all()
    e_used = int8_rows(E, head.scale).double()  # (V, D)
    want = h_used.double() @ e_used.T  # (4, V)
    scale = h_used.double().norm(dim=1, keepdim=True) * e_used.norm(dim=1)  # |h~| |e~_i|
    assert ((y.double() - want).abs() <= 2**-20 * scale + 1e-30).all()
    # A bfloat16 h (the other kernel's) errs by up to 2^-9 of each coordinate: this, by far less in rows
    # without outliers; with one 25x the row's typical size (row 1), still by less with 8 bits.
    ours, bf16 = (h - h_used).norm(dim=1), (h - h.bfloat16().float()).norm(dim=1)
    assert (ours[[0, 2, 3]] < bf16[[0, 2, 3]] / 4).all() and (seven_bits or ours[1] < bf16[1])


@pytest.mark.parametrize("kernel", KERNELS)
def test_argmax_equals_the_full_argmax_with_ties_bans_and_forced_tokens(kernel):
    V, D = 5000, 128
    E, bias = embedding(V, D), torch.zeros(V)
    head = ScreenedArgmax(E, bias, lambda h: h @ E.T + bias, kernel)
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
    # h = 0: every token ties, so screening cannot narrow anything down (the full logits decide).
    assert head(torch.zeros(2, D), ban_0).tolist() == [1, 1]
    # NaN states: no bound holds; the answer is the full logits' argmax, as without screening.
    nan = h[:2].clone()
    nan[0, 5] = float("nan")
    assert torch.equal(head(nan, lambda s: s), (nan @ E.T + bias).argmax(-1))


@pytest.mark.parametrize("kernel", KERNELS)
def test_near_ties_are_resolved_exactly(kernel):
    """Pairs of almost equal rows: the int8 scores cannot tell them apart, the rescoring must."""
    V, D = 4000, 256
    E = embedding(V, D)
    g = torch.Generator().manual_seed(3)
    # 1% apart: far above float32 rounding (so the float32 answer is not itself a tie), far below int8's.
    E[1::2] = E[0::2] + 1e-2 * E[0::2].abs().mean() * torch.randn(V // 2, D, generator=g)
    head = ScreenedArgmax(E, None, lambda h: h @ E.T, kernel)
    h = torch.randn(512, D, generator=g)
    full = (h @ E.T).argmax(-1)
    assert torch.equal(full, (h.double() @ E.double().T).argmax(-1))
    y, _ = head.approximate(h)
    assert (y.argmax(-1) != full).sum() > 100  # the approximation alone picks the wrong twin
    assert torch.equal(head(h, lambda s: s), full)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_logits_with_their_ties(kernel):
    """A bfloat16 model's logits are rounded to bfloat16 (8 significant bits), so the best score is often
    shared by several tokens: the screened argmax must return the model's own argmax, the lowest tied
    id, not the token whose unrounded score is highest."""
    V, D = 20000, 256
    g = torch.Generator().manual_seed(4)
    E = (torch.randn(V, D, generator=g) * 0.05).bfloat16()  # rows of one size: close top scores
    bias = (torch.randn(V, generator=g) * 0.1).bfloat16()
    logits = lambda h: (h @ E.T) + bias  # as Pegasus.logits computes them in bfloat16  # noqa: E731
    head = ScreenedArgmax(E, bias, logits, kernel)
    h = torch.randn(2048, D, generator=g).bfloat16()
    full = logits(h).float()
    unrounded = (h.float() @ E.float().T + bias.float()).argmax(-1)
    assert (unrounded != full.argmax(-1)).sum() > 5, "no rounding ties: the test would not test them"
    # 8 rows a call, as greedy decoding's batches: all 2,048 at once would have too many candidates in
    # all and take the fallback (the full logits).
    assert torch.equal(torch.cat([head(rows, lambda s: s) for rows in h.split(8)]), full.argmax(-1))
    y, bound = head.approximate(h)
    assert (bound - (full - y).abs()).min() >= 0  # the bound holds for the rounded logits themselves
