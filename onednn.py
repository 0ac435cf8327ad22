"""An opt-in CPU speed-up: run every float32 matmul of a model through oneDNN.

PyTorch's float32 CPU matmul is MKL's sgemm, which takes a generic code path on AMD CPUs such as
the EPYC this project is benchmarked on; oneDNN (bundled with PyTorch) uses AVX-512 there. With the
weights converted to oneDNN's layout once, decoding ran 1.6x faster and encoding 2.3x faster
(bench.py). Load the model with load_model(..., mmap=False) first: each original weight is then
freed as it is converted, where a memory-mapped checkpoint would stay resident beside the copy.
generate.py's CLI and summarize() do this for float32 on CPU; generate() itself never converts,
so the parity tests run PyTorch's default path.
"""

import torch


class OneDNNLinear(torch.nn.Module):
    """x @ weight.T + bias through oneDNN, the weight converted to its layout once. Same float32 math
    in another summation order, so logits move in the last bits (~1e-6); tests/test_generate.py
    checks that it gives the same tokens."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight.detach().to_mkldnn()  # (out, in), oneDNN layout: not a parameter any more
        self.bias = None if bias is None else bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.weight, self.bias).to_dense()


def use_onednn(model):
    """Inference only, float32 on CPU: every nn.Linear and the tied output projection run through
    oneDNN. Returns the model, changed in place (a no-op where oneDNN is unavailable)."""
    w = model.shared.weight
    if not torch.backends.mkldnn.is_available() or w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    for name in [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
        owner, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner)
        setattr(owner, attr, OneDNNLinear(getattr(owner, attr).weight, getattr(owner, attr).bias))  # old one freed
    head = OneDNNLinear(w, None)
    bias = getattr(model, "final_logits_bias", None)  # PEGASUS-X has none
    model.logits = head if bias is None else (lambda h: head(h) + bias)  # shadows Pegasus.logits on this instance
    return model
