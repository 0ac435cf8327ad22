"""Greedy decoding's exact argmax over the vocabulary, without reading all of the output matrix.

The logits h @ E^T + b read the whole (V, D) matrix E every step: 394 MB of the 1.3 GB a
pegasus-xsum step reads in float32. Greedy decoding only needs the winner, so ScreenedArgmax
(screened_argmax(model) builds one; pass it as decoding's `argmax` option, as the CLI does):
(1) scores every token with an int8 copy of E (4x fewer bytes than float32, 2x fewer than
bfloat16), with a bound on how far each approximate score can be from the model's own; (2) keeps
only the tokens whose upper bound reaches the best lower bound: only those can win; (3) rescores
those few (typically tens to hundreds) exactly as the model does and takes the argmax. The bound
is a proof, not a heuristic, so the token is the model's own argmax, ties to the lowest id included.

Where the approximate score y_i of token i can be wrong (h~ = what the int8 kernel multiplies, e~_i
= the int8 row times its scale), by Cauchy-Schwarz:
    |h.e_i - y_i| <= |h - h~| |e_i|  +  |h~| |e_i - e~_i|  +  kernel rounding
The model's logits are then rounded to its dtype, twice (the matmul's output, then + b): that moves
them by at most eps (|h| |e_i| + |b_i|), eps = 2^-7 for bfloat16 (2^-23 for float32), a fourth term.

The int8 kernel, one of two:
- "fbgemm" (x86: PyTorch's quantized linear, the kernel int8 models use). It multiplies uint8
  activations, which would make |h - h~| large (8 bits over the whole range of h: hundreds to
  thousands of tokens then passed the screen, measured on 2026-12-05). So each row of h is fed as TWO
  rows of integers on a grid s, a power of two chosen per row: k = round(h / s) (|k| <= 127), and the
  remainder in steps of s / F (F = 128), m = round((h - k s) F / s). The kernel quantizes integers
  exactly (no rounding at all), and y = (y_k + y_m / F) s is the product with h~ = (k + m / F) s,
  within s / 2F of h in every coordinate: < 2^-14 of the row's largest |h_j|. (bfloat16 rounds each
  h_j by up to 2^-9 of itself. CPUs without VNNI take 7-bit inputs: |k| <= 63, F = 64, < 2^-12.)
  One read of the matrix serves both rows, so 2 rows cost what 1 does: ~4 ms at pegasus-xsum shape
  on 2 Zen 4 threads, against 8-9.5 ms for the other kernel. Its integer sums are exact, and its
  float32 output rounding is below 2^-21 |h~| |e~_i|.
- "int8pack" (elsewhere: torch._weight_int8pack_mm) multiplies bfloat16(h), accumulates in float32
  and rounds its output to bfloat16: measured <= 2^-11 |h~| |e~_i|.
The bound allows 2^-7 |h~| |e~_i| for either kernel's rounding, a margin that also covers float32
rounding of the exact rescoring. A bfloat16 model's logits tie often; every tied winner passes the
screen, and the rescoring rounds as the model does, so ties go to the lowest id, as in the full argmax.
"""

import functools

import torch

from memory import returning_freed_memory
from quantize import fbgemm_available, fbgemm_pack, fbgemm_reduce_range

PACK_BLOCK = 8192  # rows per fbgemm matrix (8 MB): packing holds a block twice, never the whole table
SLICE = 512  # rows quantized at a time: 2 MB float temporaries (with 4096, 16 MB ones, the heap kept
# the freed ones between live blocks: a bfloat16 pegasus-xsum grew 274 MB for 99 MB of tables)


@functools.cache
def fbgemm_screen_available() -> bool:
    """Whether this PyTorch has fbgemm and its float-in, float-out int8 linear: tried on a small matrix."""
    if not fbgemm_available():
        return False
    try:
        packed = fbgemm_pack(torch.ones(8, 64, dtype=torch.int8), torch.ones(8), None)
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.ones(2, 64), 1.0, 128, packed)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def int8pack_available() -> bool:
    """Whether this PyTorch has torch._weight_int8pack_mm with its dtypes: tried on a small matrix."""
    try:
        torch._weight_int8pack_mm(torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(8, 64, dtype=torch.int8),
                                  torch.ones(8, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def screen_kernel() -> str | None:
    """The int8 kernel this machine screens with: "fbgemm", "int8pack", or None (no screening)."""
    return "fbgemm" if fbgemm_screen_available() else "int8pack" if int8pack_available() else None


def screened_argmax(model) -> "ScreenedArgmax | None":
    """Greedy decoding's exact argmax over the model's output projection (float32 or bfloat16, on
    the CPU), screened in int8, or None where there is no int8 kernel (greedy decoding then takes
    the argmax of the full logits). The int8 tables are built on first use (~1 s at pegasus-xsum
    shape), so beam search, which never calls it, does not pay for them."""
    w = model.shared.weight  # None in an int8 model (quantize.py): its head is int8 already
    if w is None or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    kernel = screen_kernel()
    if kernel is None:
        return None
    bias = model.final_logits_bias
    return ScreenedArgmax(w, None if bias is None else bias[0], model.logits, kernel)


class ScreenedArgmax:
    """argmax over h @ E^T + b (the module docstring has the bound), called as decoding calls its
    `argmax` option: (h, constrain) -> token ids."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, logits, kernel: str | None = None):
        self.E = weight.detach()  # (V, D), shared with the embedding: used for the exact rescoring
        self.bias = bias  # (V,) in the model's dtype, or None
        self.logits = logits  # h (N, D) -> the full logits (N, V), e.g. Pegasus.logits: for nearly flat scores
        self.kernel = kernel or screen_kernel()  # "fbgemm" or "int8pack"
        self.scale = None  # (V,) per-row scales, bfloat16 (what int8pack reads; fbgemm reads the same as float32)
        self.q = None  # (V, D) int8, for int8pack
        self.packed = []  # fbgemm's packed blocks of PACK_BLOCK rows, for fbgemm

    def prepare(self):
        """The int8 tables, built on first use: per-row scales, int8 rows, and for the bound each row's
        |e_i| and |e_i - e~_i| + 2^-7 |e~_i| (the kernel's margin)."""
        E, V = self.E, self.E.size(0)
        largest = torch.maximum(E.amax(1), -E.amin(1)).float()  # (V,) max |e_ij| without an |E| copy
        scale = (largest / 127).clamp_min(1e-30).bfloat16()  # (V,) per-row scale
        self.norm_e, self.slack = torch.empty(V), torch.empty(V)  # (V,) each
        self.q = torch.empty(E.shape, dtype=torch.int8) if self.kernel == "int8pack" else None  # (V, D)
        self.packed = []
        # A block's int8 rows and the copy fbgemm packs from are freed as soon as it is packed: in mappings of
        # their own (returning_freed_memory), they go straight back to the system, not into the heap's reserve.
        with returning_freed_memory():
            for start in range(0, V, PACK_BLOCK):
                block = slice(start, min(start + PACK_BLOCK, V))
                n = block.stop - start
                q = self.q[block] if self.q is not None else torch.empty(n, E.size(1), dtype=torch.int8)  # (n, D)
                for i in range(block.start, block.stop, SLICE):
                    rows = slice(i, min(i + SLICE, block.stop))
                    e, s = E[rows].float(), scale[rows].float()[:, None]  # (SLICE, D), (SLICE, 1)
                    q[i - start: rows.stop - start] = torch.round(e / s).clamp(-127, 127)
                    approx = q[i - start: rows.stop - start] * s  # e~ for these rows
                    self.norm_e[rows] = e.norm(dim=1)  # |e_i|
                    self.slack[rows] = (e - approx).norm(dim=1) + 2**-7 * approx.norm(dim=1)
                if self.kernel == "fbgemm":
                    self.packed.append(fbgemm_pack(q, scale[block].float(), None))
        self.scale = scale  # set last: approximate() builds the tables while it is None

    def fbgemm_scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, D) -> (y (N, V) = h~ @ e~^T, h~ (N, D)), h fed to fbgemm as two exact rows (module docstring)."""
        x = h.float()
        # Without VNNI the kernel's uint8 must stay below 128 (quantize.fbgemm_reduce_range): then |k| <= 63, F = 64.
        top = 63 if fbgemm_reduce_range() else 127  # largest |integer| the kernel's uint8 holds around zp = top + 1
        fine = top + 1  # F: the second row's steps are s / F; |m| <= F / 2 <= top
        largest = x.abs().amax(1, keepdim=True)  # (N, 1)
        s = torch.exp2(torch.ceil(torch.log2(largest / top)))  # (N, 1) each row's grid: a power of two
        s = torch.where(largest > top * s, 2 * s, s)  # one step coarser where log2 rounded down
        s = torch.where(largest > 0, s, 1.0)
        k = torch.round(x / s)  # (N, D) integers, |k| <= top
        m = torch.round((x - k * s) * (fine / s))  # (N, D) integers, |m| <= F / 2: the remainder in steps of s / F
        # The kernel reads integers at scale 1: quantizing them is exact. Each row's grid is applied after, as a
        # power-of-two factor (exact), so rows of different sizes each get a grid of their own.
        op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
        rows = torch.cat([k, m])  # (2N, D)
        y = torch.cat([op(rows, 1.0, top + 1, p) for p in self.packed], dim=1)  # (2N, V) k e~, m e~
        n = x.size(0)
        return (y[:n] + y[n:] / fine) * s, (k + m / fine) * s  # (N, V), (N, D): h~ exact in float32

    def approximate(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, D) -> approximate logits y (N, V) and a bound (N, V) on |the model's logits - y|."""
        if self.scale is None:
            self.prepare()
        if self.kernel == "fbgemm":
            y, h_used = self.fbgemm_scores(h)
        else:
            h_used = h.bfloat16()
            y = torch._weight_int8pack_mm(h_used, self.q, self.scale).float()  # (N, V), reads 1 byte a weight
        if self.bias is not None:
            y += self.bias.float()
        err_h = (h.double() - h_used.double()).norm(dim=1, keepdim=True).float()  # (N, 1) |h - h~|
        norm_h = h_used.float().norm(dim=1, keepdim=True)  # (N, 1) |h~|
        abs_b = 0 if self.bias is None else self.bias.float().abs()  # (V,)
        rounding = torch.finfo(self.E.dtype).eps * (h.float().norm(dim=1, keepdim=True) * self.norm_e + abs_b)
        return y, err_h * self.norm_e + norm_h * self.slack + rounding  # the four terms of the module docstring

    def __call__(self, h: torch.Tensor, constrain) -> torch.Tensor:
        """h (N, D) final decoder states -> (N,) token ids. constrain(scores) bans tokens in place
        (sets them to -inf), as decoding.constrain does to full logits."""
        least, largest = (float(v) for v in torch.aminmax(h.abs().amax(1)))  # over the rows' largest |h_j|
        # NaN or inf: the bound means nothing; a row of zeros: every token ties; and fbgemm's power-of-two
        # grids stay normal float32 numbers. Otherwise the full logits decide, as without screening.
        if not (2**-60 <= least and largest <= 2**60):
            return constrain(self.logits(h).float()).argmax(-1)
        y, bound = self.approximate(h)
        y = constrain(y)  # banned tokens -> -inf: never candidates
        best_low = (y - bound).max(dim=1, keepdim=True).values  # (N, 1): the winner's exact logit is at least this
        rows, cols = ((y + bound >= best_low) & (y > -float("inf"))).nonzero(as_tuple=True)  # (C,) candidates
        if len(cols) > self.E.size(0) // 16:  # nearly flat scores (h ~ 0): screening saves nothing, score all
            return constrain(self.logits(h).float()).argmax(-1)
        # The candidates' logits as the model computes them: float32 products and sums, rounded to its dtype
        # (a no-op for float32), then + b in its dtype (Pegasus.logits).
        exact = (h[rows].float() * self.E[cols].float()).sum(-1).to(self.E.dtype)  # (C,)
        if self.bias is not None:
            exact = exact + self.bias[cols]
        scores = torch.full_like(y, -float("inf")).index_put_((rows, cols), exact.float())  # (N, V)
        return scores.argmax(-1)  # ties go to the lowest id, as in a full argmax
