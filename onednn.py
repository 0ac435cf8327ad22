"""Opt-in CPU speed-up for float32 (and bfloat16) inference, exact up to float32 rounding:
use_onednn runs every matmul through oneDNN, with its weights packed once into the blocked layout
oneDNN's kernels read fastest. (Its companion for greedy decoding, the screened argmax that finds the
top token without reading the whole output matrix, is screen.py.)

It is an explicit seam: use_onednn swaps modules for converted ones that register their tensors
(state_dict lists them, under the same names), and nothing is patched onto the model. A packed
weight is an opaque oneDNN tensor that safetensors cannot write and that cannot move to another
device or dtype, so load_weights.save_model and model.to(...) refuse a converted model with one
line saying what to do (save or move the model before converting it).

PyTorch's float32 CPU matmul is MKL's sgemm, which takes a generic code path on AMD CPUs such as
the EPYC this project is benchmarked on; oneDNN (bundled with PyTorch) uses AVX-512 there. Decoding
one token at a time reads every weight once per step, so it is bound by memory bandwidth, and the
layout matters as much as the arithmetic: on that machine a plain (out, in) matrix streamed at
~20 GB/s through sgemm, ~36 GB/s through oneDNN, and ~60 GB/s once packed (measured in
benchmarks/speed.py's setting, 1 and 8 rows per step). These are the same ops that torch.compile's CPU
backend (inductor) emits for a frozen model: mkldnn._reorder_linear_weight, mkldnn._linear_pointwise.

A model from load_model (memory-mapped, the default) is packed straight from the page cache, and
each original weight's pages are let go as it is replaced (weight_files.mapped_tensors), so the
file's pages never stay resident beside the packed copy. generate.py's CLI and summarize() do this
for float32 on CPU; generate() itself never converts, so the parity tests run PyTorch's default path.
"""

from concurrent.futures import ThreadPoolExecutor

import torch

from pegasus import TiedEmbedding

# Rows the packed layout is chosen for. oneDNN picks a weight layout per expected batch: a GEMV-friendly
# one for 1 row, a blocked one from ~2 rows up. 64 gives the blocked layout, and a row's result does
# not depend on how many rows come with it. Measured over the 16 decoder layers' matmuls (0.94 GB of
# float32, each weight read once, as in a decoding step; 2 threads, AMD EPYC Zen 4), milliseconds:
#
#     layout for     1 row    8 rows    32 rows    505 rows
#     1 row           30.5      62        115        1265
#     64 rows         36        35         82        1133
#
# The blocked layout is the right one everywhere except a decoding step with ONE hypothesis in flight
# (greedy or sampling, one document): there the GEMV layout streams at 31 GB/s instead of 26, 5.5 ms
# per step, ~8% of a greedy summary. use_onednn(step_rows=1) packs the decoder's per-step matmuls so.
# (bfloat16 weights measured the same in both layouts: 19 ms at 1 row, 20-21 at 8.)
PACK_ROWS = 64


PACKED = "oneDNN-packed weights (onednn.use_onednn)"
MOVE_ERROR = (f"this model has {PACKED}, which cannot change device or dtype; move the model before "
              f"use_onednn, or load it again")


class Packed:
    """Mixin for converted modules: their packed tensors cannot be moved or cast, so .to(), .cuda(),
    .half() ... refuse with one line instead of failing deep inside PyTorch or leaving them behind."""

    def _apply(self, fn, recurse=True):
        raise ValueError(MOVE_ERROR)


class OneDNNLinear(Packed, torch.nn.Module):
    """x @ weight.T + bias through oneDNN, on a weight packed once. Same float32 math in another
    summation order, so logits move in the last bits (~1e-6); tests/test_generate.py checks that
    it gives the same tokens. `weight` and `bias` are registered buffers (inference only: no
    gradients), so state_dict has the nn.Linear's names."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = PACK_ROWS):
        super().__init__()
        self.rows = rows  # the rows per call the layout was chosen for (see PACK_ROWS)
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))  # opaque
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out), ordinary tensors
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")


def per_step(name: str) -> bool:
    """Whether the matrix at module path `name` runs once per decoding step, on one row per hypothesis:
    the decoder's, except cross-attention's keys/values (computed once, from every source position)."""
    return name.startswith("decoder.") and not name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj"))


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def bf16_supported() -> bool:
    """Whether oneDNN has fast bfloat16 kernels on this CPU (AVX-512 BF16, AMX, or AVX-512 BW/VL/DQ
    with conversion). Without them packing bfloat16 weights is refused, and bfloat16 matmuls are slow."""
    return available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedTiedEmbedding(Packed, TiedEmbedding):
    """The tied embedding, whose output projection (`project`, the logits' matmul) runs through
    oneDNN on a packed copy of the matrix. The copy is made on first use (greedy decoding with
    screen.ScreenedArgmax never needs it) and registered as a non-persistent buffer: state_dict keeps
    only `weight`, which token lookups still read."""

    def __init__(self, embedding: TiedEmbedding):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                         _weight=embedding.weight.detach(), _freeze=True)  # shares the tensor, no copy
        self.register_buffer("packed", None, persistent=False)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)  # (V, D), opaque
        return torch.ops.mkldnn._linear_pointwise(h.contiguous(), self.packed, None, "none", [], "")  # (..., V)


def use_onednn(model, step_rows: int | None = None):
    """Inference only, on CPU: every nn.Linear and the tied output projection run through oneDNN.
    float32 always; bfloat16 where the CPU has fast bfloat16 kernels (bf16_supported; oneDNN then
    accumulates in float32 and rounds each output to bfloat16, as PyTorch's own bfloat16 matmul).
    Returns the model, changed in place (a no-op where oneDNN or the dtype's kernels are unavailable).

    step_rows: the hypotheses each decoding step will run, where the caller knows it (the CLI). With 1,
    the decoder's per-step matmuls are packed for one row (PACK_ROWS has the measurements); the
    encoder's, and cross-attention's keys/values (computed once, from every source position), stay
    blocked. Such a model still decodes anything, only beam search and batches more slowly.

    Packing is mostly writing fresh memory (page faults), which one thread does at a time per call:
    torch.get_num_threads() weights are packed at once (the op releases Python's lock). Measured at
    pegasus-xsum shape (257 matrices), from the page cache: 2.0 s on one core."""
    w = model.shared.weight  # None in an int8 model whose table lives in fbgemm's packed copy (quantize.py)
    fast = w is not None and (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and bf16_supported()))
    if not available() or not fast or w.device.type != "cpu":
        return model

    def convert(name: str):
        owner, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner)
        linear = getattr(owner, attr)
        rows = 1 if per_step(name) and step_rows == 1 else PACK_ROWS
        setattr(owner, attr, OneDNNLinear(linear.weight, linear.bias, rows))  # the old one freed on return

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(convert, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]))
    model.shared = PackedTiedEmbedding(model.shared)  # Pegasus.logits calls its `project`
    return model
