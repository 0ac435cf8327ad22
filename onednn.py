"""An opt-in CPU speed-up: run every float32 matmul of a model through oneDNN, with its weights
packed once into the blocked layout oneDNN's kernels read fastest.

PyTorch's float32 CPU matmul is MKL's sgemm, which takes a generic code path on AMD CPUs such as
the EPYC this project is benchmarked on; oneDNN (bundled with PyTorch) uses AVX-512 there. Decoding
one token at a time reads every weight once per step, so it is bound by memory bandwidth, and the
layout matters as much as the arithmetic: on that machine a plain (out, in) matrix streamed at
~20 GB/s through sgemm, ~36 GB/s through oneDNN, and ~60 GB/s once packed (measured in
bench.py's setting, 1 and 8 rows per step). These are the same ops that torch.compile's CPU
backend (inductor) emits for a frozen model: mkldnn._reorder_linear_weight, mkldnn._linear_pointwise.

Load the model with load_model(..., mmap=False) first: each original weight is then freed as it is
packed, where a memory-mapped checkpoint would stay resident beside the copy. generate.py's CLI and
summarize() do this for float32 on CPU; generate() itself never converts, so the parity tests run
PyTorch's default path.
"""

import torch

# Rows the packed layout is chosen for. oneDNN picks a weight layout per expected batch: for 1 row
# it keeps a GEMV-friendly layout that streams ~1.4x slower than the blocked one it picks from ~4
# rows up. 64 gives the blocked layout, which measured fastest for 1, 8, 32 and 505 rows alike, and
# a row's result does not depend on how many rows come with it.
PACK_ROWS = 64


class OneDNNLinear(torch.nn.Module):
    """x @ weight.T + bias through oneDNN, on a weight packed once. Same float32 math in another
    summation order, so logits move in the last bits (~1e-6); tests/test_generate.py checks that
    it gives the same tokens."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)  # opaque oneDNN layout
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out), ordinary tensors
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def use_onednn(model):
    """Inference only, float32 on CPU: every nn.Linear and the tied output projection run through
    oneDNN. Returns the model, changed in place (a no-op where oneDNN is unavailable)."""
    w = model.shared.weight
    if not available() or w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    for name in [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
        owner, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner)
        setattr(owner, attr, OneDNNLinear(getattr(owner, attr).weight, getattr(owner, attr).bias))  # old one freed
    head = OneDNNLinear(w, None)
    bias = getattr(model, "final_logits_bias", None)  # PEGASUS-X has none
    model.logits = head if bias is None else (lambda h: head(h) + bias)  # shadows Pegasus.logits on this instance
    return model
