"""int8 weights for PEGASUS / PEGASUS-X inference on CPU (in the spirit of gpt-fast's quantize.py).

The scheme
----------
Every weight matrix W (out, in) is stored as int8 with one float32 scale per output channel (row):

    s_o = max_i |W_oi| / 127        q_oi = round(W_oi / s_o)  in [-127, 127]        W_oi ~ s_o * q_oi

Symmetric (no zero point): a weight's sign and magnitude survive as they are, and x @ W^T becomes
(x @ q^T) * s, a scale per output column applied after an integer matmul. Per *output channel*
because rows of trained weights differ in size by an order of magnitude or more: one scale for the
whole matrix would give small rows only a few of the 255 levels (tests/test_quantize.py checks
that such a quantizer fails the error bounds). The rounding error is at most s_o / 2 per weight,
i.e. at most 1/254 of its row's largest weight.

Activations stay float between layers. Inside fbgemm's kernel (torch.ops.quantized.linear_dynamic)
each call quantizes its input x on the fly, one scale and zero point for the whole input matrix
(all rows: a row's result depends slightly on the other rows of the batch), to uint8, multiplies
int8 x uint8 with int32 accumulation, and converts back to float with s_x * s_o, adding the bias.

reduce_range: on CPUs without VNNI (this AVX2 AMD EPYC; also AVX-512 without VNNI) fbgemm's inner
instruction is vpmaddubsw, which adds two uint8 x int8 products into an int16 *with saturation*:
2 * 255 * 127 = 64770 does not fit in 32767, and the sum silently clips. reduce_range=True
quantizes activations to 7 bits (0..127), so 2 * 127 * 127 = 32258 always fits. With VNNI
(vpdpbusd, Intel Cascade Lake and later, AMD Zen 4) products go straight into int32 and the full
8 bits are safe and twice as fine. Rather than guessing from CPU flags, `fbgemm_reduce_range()`
asks the kernel: it runs one input built to saturate (measured here without reduce_range: 0.49
instead of 62; with it: 62.49) and turns reduce_range on exactly when the answer is wrong.

Why int8 is faster
------------------
Decoding one token per step reads every weight once per step and does ~2 flops per weight: it is
bound by memory bandwidth, and int8 reads 4x fewer bytes than float32 (and the packed layout
streams well). The encoder (prefill, ~500 rows at once) is compute bound; there the int8 dot
product instructions do 4x more multiply-adds per instruction than float32 FMA. Measured on this
machine (AMD EPYC, AVX2 only: no AVX-512, no VNNI, no AMX; torch 2.13; 1 thread; medians of 7; the
2 cores were shared with other jobs, load average 5-8, so the figures are rough), milliseconds per
matmul at pegasus-xsum shapes; "err" is Int8Linear's relative error |y - y64| / |y64| against a
float64 matmul (float32's own: 3e-7), with N(0, 1) inputs and rows of varied size:

    (out, in)      rows   fp32 F.linear  oneDNN packed fp32  Int8Linear   speed-up vs best fp32   err
    (1024, 1024)      1        0.12            0.16             0.07           1.7x             1.6%
                      8        0.52            0.30             0.15           2.0x             1.9%
                     32        1.50            1.42             0.72           2.0x             2.0%
                    505        36.5            35.0             21.6           1.6x             2.3%
    (4096, 1024)      1        1.04            1.09             0.20           5.2x             1.6%
                      8        6.94            5.96             0.45            13x             1.8%
                     32        14.0            8.65             6.69           1.3x             2.1%
                    505         120             165               87           1.4x             2.2%
    (1024, 4096)      1        0.80            1.26             0.35           2.3x             1.7%
                      8        9.20            6.37             0.73           8.7x             2.1%
                     32        14.1            13.4             10.6           1.3x             2.2%
                    505         156             173              112           1.4x             2.5%
    (96103, 1024)     1        70.9            96.1             22.2           3.2x             1.5%
    (output head)     8         320             185             34.3           5.4x             1.9%
                     32         619             357              187           1.9x             2.0%

A second 1-thread run agreed within ~30% (e.g. head at 1 / 8 / 32 rows: 15 / 27 / 78 ms int8 vs 57 /
128 / 174 ms best float32). With 2 threads the small matmuls were dominated by waiting for the
second, busy core (4-16 ms steps, whatever the kernel); the large ones: 505 rows 12 / 33 / 50 ms
int8 vs 24 / 68 / 67 ms best float32 for the three layer shapes, head 12 / 24 / 68 ms vs 52 / 92 /
188 ms.

The error is almost all the input's quantization (7 bits, one scale for the whole input matrix, so
it grows with the number of rows): the int8 weights alone (the weight-only fallback) give 0.8-0.9%.
PyTorch's other int8 path, the onednn engine's dynamic linear, measured 0.32 / 1.26 / 1.47 ms at 1
row for the three layer shapes (2-5x slower than fbgemm here) and 0.92 / 7.6 / 7.6 ms at 32 rows.
bfloat16 is no option on this CPU: mkldnn's bf16 support check says False, and packing bf16
weights (mkldnn._reorder_linear_weight) refuses without AVX-512 BW/VL/DQ or AVX-NE-CONVERT.

On Intel with AVX-512 VNNI the same fbgemm call runs 512-bit vpdpbusd kernels (one instruction per
four multiply-adds into int32, no saturation, so reduce_range becomes False and activations keep 8
bits); with AMX (Sapphire Rapids and later) oneDNN's int8 tile kernels are 2-4x faster than fbgemm's
for the many-row matmuls (the encoder, beam search over a batch), so there those matrices are packed
for oneDNN (choose_kernel, and the table in "oneDNN's kernel" below), while the one-row decoding steps
stay memory bound and stay with fbgemm. With AVX-512 VNNI but no AMX (AMD Zen 4) oneDNN wins only the
output head, from 16 rows per call. On CUDA, where PyTorch was built without fbgemm, or where its deprecated
quantized tensors (which fbgemm's packing reads) are gone (fbgemm_available), Int8Linear falls back to
weight-only int8: float activations times the dequantized weight (no speed-up, the same memory saving at rest).

Memory
------
fbgemm packs the int8 matrix into its own blocked layout (plus one int32 column offset per output
channel). Keeping both the plain int8 buffer and the packed copy would cost 2 bytes a weight, so
`Int8Linear.pack()` releases the plain buffer and `unpack()` restores it exactly from fbgemm's copy
(torch.ops.quantized.linear_unpack; oneDNN's copy: its to_dense(), transposed); state_dict,
load_state_dict and .to() unpack first, so the
module saves, loads and moves like any other. At pegasus-xsum shape (568.7M parameters, 2.27 GB
in float32): 470M linear weights packed (0.47 GB), the int8 embedding table (98M, 0.10 GB) and the
int8 output head packed beside it (0.10 GB): ~0.67 GB, 0.29x of float32's weights; ~0.57 GB when
the table's lookups read the checkpoint (Int8TiedEmbedding.lookup_from, below). Measured peak
RSS (one process each, random weights, encode 505 tokens then 10 greedy and 10 beam-8 steps; the
~0.3 GB of the PyTorch runtime is in every figure): float32 read into memory, then packed for
oneDNN 3.17 GB; float32 built in the process 2.59 GB; int8 (skeleton on the meta device,
an int8 state file holding the table once, torch.load, pack, int8_head) 1.14 GB, 0.36x of the
float32 load path (0.31x without the runtime), 1.00 GB at rest. quantize_int8 on a float model in
the same process adds 0.04 GB to the float model's peak (one layer at a time). The CLI's int8 path
since lookup_from (load_model from safetensors, 2 threads, Zen 4, benchmarks.speed's greedy job):
0.81 GiB at rest, 0.92-0.96 GiB at the peak, where it was 0.91-0.92 and 1.00-1.04 GiB. Since the lookups read
rows from the file rather than through a memory map (whose page faults mapped ~118 MiB around
the article's ~300 rows) and the decoder cache is one block per kind: beam 8 over 4 documents
1.23-1.29 GiB at the peak, where it was 1.43-1.45 (benchmarks.speed, fresh processes, 2026-12-06).
Packing the head holds its int8 table twice (the copy fbgemm packs from, and the result): load_model
reads the table first and packs the head at once, while ~0.35 GiB is resident, not after the other
matrices: the load's peak went from 913-953 to 831-845 MiB, at rest 819 (2026-12-07, Zen 4). Each block
of rows is quantized in one float32 buffer (memory.ThreadBuffer), not a fresh temporary that left a hole in the heap
per matrix: 873-946 MiB resident after the last matrix -> 786, the load's peak 812-834 (2026-12-07 evening).

Quality (tests/test_quantize.py, against float32 on the same model; |dlogit| relative to the
float logits' standard deviation): a random PEGASUS / PEGASUS-X at a small shape with uneven rows,
max 0.17 / 0.16, mean 0.031 / 0.034, top-1 agreement 0.92 / 0.96; a toy model trained in the test,
teacher-forced, max 0.24, mean 0.012, top-1 0.9965; its generated ids are identical for 47 of 48
sources greedy and 46 of 48 with beam 4 (with decoding's liberties below, each source's cross keys/values at its
own length included: 47 before that one; 48 and 46 without the liberties).

How it plugs into the model
---------------------------
    quantize_model(model)     # every nn.Linear -> Int8Linear, model.shared -> Int8TiedEmbedding

quantize_model also lets decoding take liberties that float32 never takes (Pegasus.__init__): `encode_each`,
each right-padded document of a batch encoded alone at its own length (decoding.encode: no work on padding,
and a document's activations are not scaled together with its batch-mates'), and, where oneDNN has bfloat16
kernels, `kv_dtype = bfloat16` for beam search's attention keys/values, and greedy decoding's too on a CPU
with AMX or for sources of 4,096 tokens and more (pegasus.DecoderCache: half the bytes read and reordered each
step). Measured at pegasus-xsum shape, beam 8 over 4 documents of 505-313 tokens, int8, 2 threads, Zen 4:
encoder 1.9 -> 1.3 s, cross-attention ~24 -> ~14 ms per step, cache reorder 0.58 -> 0.31 s; against float32
they leave int8's error where it was (tests/test_quantize.py::test_decoding_liberties_stay_close). On a CPU
with AMX, a third: the encoder's attention in bfloat16 (`Attention.compute_dtype`), on the fused kernel's
bfloat16 tiles, its float32 results cast back (Intel Xeon, 2 threads, alternating fresh processes: one
505-token document's int8 encoding 0.235-0.238 -> 0.194 s; PEGASUS-X base's encoder, one pair: 1.8 -> 1.3 s at
4,096 tokens, 8.5 -> 7.1 s at 16,384, peak 1.36 -> 1.39 GB), its error measured in tests/test_quantize.py
(test_encoder_attention_in_bfloat16_is_taken_and_stays_close, and the liberties' test with it).

Two more are for peak memory (the issue's bound: int8 at most 1/3 of float32's peak RSS). `cross_kv_int8`: greedy
decoding's cross-attention keys/values, float32 where they are not narrowed, in int8 instead (Int8CrossKV, below:
a scale per source, head and channel, applied to the queries and the output; 16 MiB where float32 took 63 at
pegasus-xsum shape, 505 tokens, at float32's speed) while one layer's fit pegasus.DecoderCache.cross_int8_bytes.
`ffn_rows` on the encoder's layers: the feed-forward over blocks of ENCODER_FFN_ROWS positions, so that its largest
activations (d_ffn wide, with fbgemm's int32 sums of the same size) are 1 MB each, not 8. Measured, pegasus-xsum
shape, benchmarks.speed's greedy job (one 505-token article, int8, 2 threads, Zen 4, MiB): 826 at rest; encoder
876-897 -> 859-872 (with the residual sums written in place, pegasus.EncoderLayer); decoding 902-926 -> 856-865 (now
and then 20-30 more); the process's peak 905-929 -> 860-921, 19 of 26 processes at or under 873, 1/3 of float32's
2,620 (README, "Near the line, and why"). Their errors: tests/test_quantize.py (test_int8_cross_keys_values_stay_close,
test_feed_forward_over_blocks_of_positions).

The tied embedding becomes an Int8TiedEmbedding: lookups dequantize the rows they read, and its
`project` (what Pegasus.logits calls for the output head, before adding final_logits_bias) runs
fbgemm on a packed copy of the same int8 rows and scales. The packed copy is a plain attribute,
not a buffer: a state_dict holds the table once (`shared.weight` int8, `shared.scale`), as float
checkpoints hold `shared.weight` once. The model reads its activations' dtype and device from
Pegasus.dtype / .device (a LayerNorm's weight), never from the int8 table. load_model, reading a
safetensors file or a .bin, also hands `lookup_from` a reader of the table's float rows in the file
(weight_files.RowReader): lookups then read and quantize just the rows they need (giving the
table's own int8 values), and packing lets go of the plain table, as Int8Linear's packing does.

load_weights.load_model(..., quantize="int8") never builds the float model: the model is built on
the meta device, quantize_model turns its layers into int8 skeletons, and each checkpoint tensor is
read and quantized on its own (`quantize_weight`) before the next is read, so the float weights
never all exist at once. save_model writes `float_state_dict`: the dequantized float32 weights
q * s, which is the model the int8 one computes with; loading that file with quantize="int8" gives
back the same int8 values (tests/test_int8_model.py checks it), and transformers reads it as any
checkpoint. (int8_embedding_and_head is the same tied pair as two separate modules, for tests and
for models other than Pegasus.)
"""

import functools
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

from memory import ThreadBuffer
from onednn import bf16_supported, per_step
from pegasus import cpu_has_amx, set_attention_dtype

# quantize_weight works on blocks of rows of at most this many floats (512 KB), in one buffer (_SCRATCH):
# no full float temporary of a big matrix (the 96103 x 1024 embedding), and no fresh allocation per block.
CHUNK_ELEMENTS = 2**17


# ----------------------------------------------------------------------------- the arithmetic


def int8_scale(largest: torch.Tensor) -> torch.Tensor:
    """Symmetric int8's scale from the largest |x| of each group: largest / 127, and 1 for an all-zero group
    (any scale represents it exactly)."""
    return torch.where(largest > 0, largest / 127, torch.ones_like(largest))


_SCRATCH = ThreadBuffer(torch.float32)  # quantize_weight's blocks of rows (memory.ThreadBuffer: why one buffer)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w (out, in) float -> q (out, in) int8, scale (out,) float32,
    with w ~ q * scale[:, None]. All-zero rows get scale 1 (any scale represents them exactly)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)  # (out, in)
    scale = torch.empty(w.size(0), dtype=torch.float32, device=w.device)  # (out,)
    # A few passes over each block of rows (loading a checkpoint quantizes 2.3 GB with this), in place in
    # one float32 buffer (a copy: w itself is never written): max |w| as max(max w, -min w) (no |w| copy;
    # 14x faster here than torch.linalg's inf-norm, same value), divide, round, convert. No clamp:
    # |w| <= largest, so |w / s| <= 127 up to one rounding of the division, and round() cannot reach 128.
    step = max(1, CHUNK_ELEMENTS // w.size(1))  # rows per block
    size = min(step, w.size(0)) * w.size(1)
    buffer = _SCRATCH.get(size) if w.device.type == "cpu" else torch.empty(size, device=w.device)  # (size,)
    for i in range(0, w.size(0), step):
        block = w[i: i + step]  # (r, in), any float dtype
        rows = buffer[: block.numel()].view(block.shape).copy_(block)  # (r, in) float32
        s = int8_scale(torch.maximum(rows.amax(1), -rows.amin(1)))  # (r,) from max |w|
        q[i: i + step] = rows.div_(s[:, None]).round_()
        scale[i: i + step] = s
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q (out, in) int8, scale (out,) -> the float weight q * scale[:, None] that the int8 one stands for."""
    return q.to(dtype) * scale.to(dtype)[:, None]  # (out, in)


# ----------------------------------------------------------------------------- the fbgemm kernel


_WARNINGS = threading.Lock()  # see fbgemm_pack


@functools.cache
def fbgemm_available() -> bool:
    """fbgemm is PyTorch's x86 int8 GEMM library (AVX2 / AVX-512 / VNNI kernels): whether this PyTorch has it
    and its ops still run, tried once on a small matrix (fbgemm_reduce_range's probe). Its packing reads the
    "quantized tensors" that PyTorch deprecated in 2.13, to be removed in a later release: where they are gone,
    int8 runs weight-only, as on a GPU (Int8Linear.forward), rather than failing at load."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        fbgemm_reduce_range()
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def choose_kernel(t: torch.Tensor, rows_per_call: int | None, onednn_from: tuple[int | None, int | None]) -> str | None:
    """Which library a matrix on `t`'s device is packed for: "onednn" when each call will bring at least
    onednn_from[0] rows on a CPU with AMX, onednn_from[1] with VNNI but no AMX (see the oneDNN section
    below), else "fbgemm" where PyTorch has it, else None (weight-only int8). rows_per_call None: not
    known, fbgemm."""
    if t.device.type != "cpu":
        return None
    start = onednn_from[0] if amx_int8() else onednn_from[1] if vnni_int8() else None
    if rows_per_call is not None and start is not None and rows_per_call >= start:
        return "onednn"
    return "fbgemm" if fbgemm_available() else None


def fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """int8 weight (out, in), scales (out,), float bias -> fbgemm's packed weight (an opaque object)."""
    return fbgemm_prepack(per_channel_qint8(q, scale), bias)


def per_channel_qint8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The per-channel "quantized tensor" (out, in) that PyTorch's packing op reads: a copy of q, made
    for the packing only (a caller that can let go of q does so before fbgemm_prepack: two copies of
    the matrix at the peak, not three)."""
    # PyTorch deprecates quantized tensors in favour of torchao. catch_warnings swaps the process's
    # filter list and puts it back on exit, which interleaved in two threads (pack_all) would leave
    # our "ignore" in force: one thread at a time here; only the packing itself runs in parallel.
    with _WARNINGS, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zero = torch.zeros(q.size(0), dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)  # (out, in) qint8


def fbgemm_prepack(qw: torch.Tensor, bias: torch.Tensor | None):
    """per_channel_qint8's tensor and a float bias -> fbgemm's packed weight. The quantized engine is a
    process-wide setting that chooses which library packs; we choose fbgemm explicitly for this call
    and restore the user's setting."""
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().contiguous())
    finally:
        torch.backends.quantized.engine = engine


def fbgemm_unpack(packed) -> torch.Tensor:
    """fbgemm's packed weight -> the int8 matrix (out, in) it was packed from (exactly)."""
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def sums_exactly(linear) -> bool:
    """Whether an int8 kernel adds its uint8 x int8 products without int16 saturation (see the module
    docstring), asked with one input built to saturate: x = [-1, 1, ..., 1] quantizes to uint8 0 and
    255, the weights are all +127, so each pair of products is 2 * 255 * 127 > 32767. Without
    saturation the answer is 62; with it, far off. linear(x, q, scale) -> (2, 8) runs the kernel."""
    x = torch.ones(2, 64)
    x[:, 0] = -1
    y = linear(x, torch.full((8, 64), 127, dtype=torch.int8), torch.full((8,), 1 / 127))  # (2, 8)
    return bool(((y - 62).abs() < 2).all())


@functools.cache
def fbgemm_reduce_range() -> bool:
    """Whether fbgemm's kernel on this CPU needs 7-bit activations to avoid int16 saturation."""
    return not sums_exactly(lambda x, q, s: torch.ops.quantized.linear_dynamic(x, fbgemm_pack(q, s, None), False))


# ----------------------------------------------------------------------------- oneDNN's kernel (AMX)
#
# On a CPU with AMX (Intel Sapphire Rapids and later) oneDNN multiplies int8 matrices with tile
# instructions, fbgemm does not: for many rows per call oneDNN is 2-4x faster, for one row fbgemm's
# streaming kernel is. The arithmetic is the same: activations quantized to uint8 with one scale and
# zero point for the whole input (torch.quantize_per_tensor_dynamic chooses them as fbgemm does),
# int32 accumulation, then * s_x * s_o + bias; the outputs agree to float32 rounding (|dy| ~ 5e-7 for
# |y| ~ 5). Measured (Intel Xeon with AMX, 2 threads, torch 2.13), ms per call, fbgemm / oneDNN:
#
#     (out, in)       1 row          8 rows         32 rows        505 rows
#     (1024, 1024)    0.024 / 0.048  0.042 / 0.058  0.094 / 0.090  1.19 / 0.53
#     (4096, 1024)    0.068 / 0.132  0.105 / 0.135  0.305 / 0.193  6.32 / 1.26
#     (1024, 4096)    0.082 / 0.116  0.123 / 0.158  0.333 / 0.236  4.33 / 2.16
#     (96103, 1024)   2.87 / 3.34    5.84 / 3.13    11.7 / 6.17        -
#
# So a layer is packed for oneDNN from 16 rows per call (the encoder, cross-attention's keys/values,
# beam search over batches), the 96103-row output head from 8 (beam 8 over one document); below that,
# fbgemm. Without AMX but with AVX-512 VNNI (AMD Zen 4, 2 threads, medians of 15) fbgemm wins the layers
# (32 rows: 0.11 / 0.16, 0.37 / 0.43, 0.40 / 0.48 ms; 505 rows: level) and oneDNN only the head, by
# 8-15% from 16 rows: 8 rows 3.5-4.5 / 4.8-5.8 ms, 16 rows 7.5-8.3 / 6.8-7.4, 32 rows 11.7-13.5 / 10.8-11.9,
# 64 rows 22.1-22.3 / 18.9-19.0. On CPUs without VNNI, fbgemm (oneDNN's uint8 x int8 sums can saturate
# there: see the kernels' tests). We call oneDNN's own int8 ops (torch.ops.onednn, what PyTorch's
# inductor emits for int8 models), not linear_prepack with the onednn engine: that keeps a second, plain
# int8 copy of every matrix beside the packed one.
# Rows per call from which a matrix is packed for oneDNN: (on a CPU with AMX, with VNNI but no AMX); None: never.
LAYER_ONEDNN_ROWS, HEAD_ONEDNN_ROWS = (16, None), (8, 16)
ENCODER_FFN_ROWS = 128  # positions per block of the int8 encoder's feed-forward (quantize_model)
SOURCE_ROWS = 512  # the rows_per_call hint for matrices that see a whole source (quantize_model): "many"
_ZERO_POINT = torch.zeros(1, dtype=torch.long)  # the weights' zero point: symmetric, 0 for every channel


def cpu_and_onednn_int8(cpu_has) -> bool:
    """Whether cpu_has() (one of torch.cpu's instruction-set checks), PyTorch has oneDNN's int8 linear ops,
    and they sum without saturating here (onednn_int8_exact)."""
    try:
        return cpu_has() and hasattr(torch.ops.onednn, "qlinear_pointwise") and onednn_int8_exact()
    except (AttributeError, RuntimeError):  # an older PyTorch
        return False


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 linear sums uint8 x int8 products exactly (sums_exactly). The CPU's flags do not
    settle it: ONEDNN_MAX_CPU_ISA (e.g. AVX2, or AVX512_CORE to keep oneDNN off AMX) holds oneDNN below them,
    where it runs without VNNI and its sums clip (the Zen 4 with ONEDNN_MAX_CPU_ISA=AVX2, before this check:
    outputs off fbgemm's by up to 0.84, where tests/test_quantize.py holds them within 1e-5 of the largest)."""
    return sums_exactly(lambda x, q, s: onednn_linear(x, onednn_pack(q), s, None))


@functools.cache
def amx_int8() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later), and oneDNN's int8 ops."""
    return cpu_and_onednn_int8(cpu_has_amx)


@functools.cache
def vnni_int8() -> bool:
    """AVX-512 VNNI (int8 dot products into int32; AMD Zen 4, Intel since Cascade Lake), and oneDNN's int8 ops."""
    return cpu_and_onednn_int8(lambda: torch.cpu._is_vnni_supported())


@functools.cache
def quantized_tensors_warned() -> None:
    """onednn_linear makes a quantized tensor per call, and the first one in a process warns that they are
    deprecated (torch 2.13: once per process, from C++): have it warn here, silenced (see per_channel_qint8)."""
    with _WARNINGS, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.quantize_per_tensor_dynamic(torch.zeros(1), torch.quint8, False)


def onednn_pack(q: torch.Tensor) -> torch.Tensor:
    """int8 weight (out, in) -> oneDNN's blocked layout of its transpose (an opaque tensor), chosen for
    calls of ~64 rows (the layout measured fastest at 32 and 505 rows alike)."""
    quantized_tensors_warned()
    return torch.ops.onednn.qlinear_prepack(q, [64, q.size(1)])


def onednn_unpack(packed: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed weight -> the int8 matrix (out, in) it was packed from (exactly)."""
    return packed.to_dense().t().contiguous()  # to_dense gives (in, out)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """float32 x (..., in) -> x @ (q * scale)^T + bias (..., out), activations quantized as fbgemm's."""
    xq = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)  # (..., in) uint8, one scale / zero point
    return torch.ops.onednn.qlinear_pointwise(xq.int_repr(), xq.q_scale(), xq.q_zero_point(), packed, scale,
                                              _ZERO_POINT, bias, 1.0, 0, torch.float32, "none", [], "")


def unpack_weight(packed, kernel: str) -> torch.Tensor:
    """Either library's packed weight -> the int8 matrix (out, in)."""
    return onednn_unpack(packed) if kernel == "onednn" else fbgemm_unpack(packed)


def packed_linear(x: torch.Tensor, packed, kernel: str, scale: torch.Tensor, bias: torch.Tensor | None):
    """x (..., in) -> (..., out) in x's dtype, through the library that packed the weight."""
    x32 = x.float().contiguous()
    if kernel == "onednn":  # (float32 scales and bias, also after a .double() of the module)
        y = onednn_linear(x32, packed, scale.float(), None if bias is None else bias.float())
    else:  # fbgemm: the packed weight holds its scales and bias
        y = torch.ops.quantized.linear_dynamic(x32, packed, fbgemm_reduce_range())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- modules


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias with int8 weights q (out, in), float scales (out,) and bias (out,).

    The three are registered buffers: state_dict, load_state_dict, torch.save and .to() treat them
    like any module's tensors. On a CPU the weight is packed on the first forward (or by pack()) for
    fbgemm, or for oneDNN where the CPU has AMX and `rows_per_call` says calls bring many rows
    (choose_kernel); packing releases the plain int8 buffer (self.weight is then None) so that one
    copy of the weights is resident, and unpack() restores it exactly. Saving, loading and moving
    unpack first; the next forward packs again. Elsewhere (CUDA, no fbgemm) forward multiplies float
    activations by the int8 weight converted to float (weight-only int8). Inference only: there is
    no gradient through q."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        """An empty skeleton, as nn.Linear(in, out, bias): fill it with load_state_dict."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, device=device))  # (out,) float32
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)  # (out,)
        self.packed = None  # the packed copy of weight (then self.weight is None), or None
        self.kernel = None  # the library `packed` is for: "fbgemm" (holds scale and bias too) or "onednn"
        self.rows_per_call = None  # rows each call will bring, where known (a hint for choose_kernel)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Quantize a float weight (out, in) and keep the float bias (out,). (The tied output head is
        better built by int8_head, from the int8 embedding, so the table is quantized once.)"""
        m = cls(weight.size(1), weight.size(0), bias is not None, device="meta")  # no allocation
        if weight.is_meta:  # a skeleton to load into (load_weights): shapes only, nothing to compute
            return m
        m.weight, m.scale = quantize_weight(weight.detach())
        m.bias = None if bias is None else bias.detach().float()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls.from_weight(linear.weight, linear.bias)

    def pack(self, kernel: str | None = None) -> "Int8Linear":
        """Move the int8 weight into a packed layout: `kernel` ("fbgemm" or "onednn"), or choose_kernel's
        choice (a no-op where there is none: CUDA, no fbgemm)."""
        if self.packed is not None:  # every forward calls pack(): nothing more to decide once packed
            return self
        kernel = kernel or choose_kernel(self.scale, self.rows_per_call, LAYER_ONEDNN_ROWS)
        if kernel is not None:
            q = self.weight
            self.weight = None  # the packed copy will be the only one (see the module docstring); let go first
            if kernel == "onednn":
                self.packed = onednn_pack(q)
            else:
                qw, q = per_channel_qint8(q, self.scale.float()), None  # (q freed before fbgemm's copy is made)
                self.packed = fbgemm_prepack(qw, self.bias)
            self.kernel = kernel
        return self

    def unpack(self) -> "Int8Linear":
        """Bring the plain int8 buffer back from the packed copy and drop the packed one."""
        if self.packed is not None:
            self.weight, self.packed = unpack_weight(self.packed, self.kernel), None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        self.pack()  # rebuilds the cache after load_state_dict or a move; a no-op once packed
        if self.packed is not None:
            return packed_linear(x, self.packed, self.kernel, self.scale, self.bias)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)  # (..., out): scale the outputs, not W
        return y if self.bias is None else y + self.bias.to(x.dtype)

    # nn.Module's own machinery reads and writes registered buffers; give it the plain int8 one.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # while packed: scale, bias (weight is None)
        if self.packed is None:
            return
        destination[prefix + "weight"] = unpack_weight(self.packed, self.kernel)  # a copy for saving; stays packed
        destination.move_to_end(prefix + "scale")  # keep the order weight, scale, bias
        if self.bias is not None:
            destination.move_to_end(prefix + "bias")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.unpack()  # the loaded weight lands in the plain buffer; the next forward packs it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # .to(), .cpu(), .cuda(), .float(), ...
        self.unpack()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packed={self.kernel if self.packed is not None else None}")


class Int8Embedding(nn.Module):
    """Token embedding from an int8 table (V, D) with a float scale per row: a lookup dequantizes only
    the rows it reads, so the float table need not exist. Built from the same matrix as the tied
    output head, with the same per-row scales, it holds exactly the head's int8 values."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, device=device))  # (V,) float32

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int8Embedding":
        """Quantize a float table (V, D), one scale per row (per token)."""
        m = cls(*weight.shape, device="meta")
        if weight.is_meta:  # a skeleton (as Int8Linear.from_weight)
            return m
        m.weight, m.scale = quantize_weight(weight.detach())
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., D) float
        return self.int8_rows(ids).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def int8_rows(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., D) int8
        return self.weight[ids]


class Int8TiedEmbedding(Int8Embedding):
    """The tied token embedding in int8: lookups as Int8Embedding, and `project` h (..., D) -> h @ E^T
    (..., V), the output head without its bias (Pegasus.logits adds final_logits_bias), from the same
    int8 rows and scales. On CPU the head runs on a packed copy (fbgemm's, or oneDNN's for
    `rows_per_call` of 8 or more on AMX, 16 with VNNI alone: choose_kernel), made on first use and
    kept as a plain attribute (not in state_dict: the table is saved once); loading and moving drop
    it, and the next project packs again.

    The packed copy cannot be read a row at a time, so lookups need the plain table too: 98 MB more
    at pegasus-xsum shape, a tenth of the int8 model. Unless lookup_from gives the float table it was
    quantized from (load_model: the checkpoint's, read from the file): then lookups quantize just the rows
    they read, which gives the same int8 values, and packing lets go of the plain table, as
    Int8Linear does (state_dict, loading and moving unpack it)."""

    packed = None  # the packed copy of weight, or None
    kernel = None  # the library `packed` is for: "fbgemm" (holds the scales too) or "onednn"
    rows = None  # the float (V, D) table lookups read while packed (lookup_from), or None
    rows_per_call = None  # rows each project() call will bring, where known (a hint for choose_kernel)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8TiedEmbedding":
        return cls.from_weight(embedding.weight)

    def lookup_from(self, source: torch.Tensor) -> "Int8TiedEmbedding":
        """Let lookups read `source`, the float (V, D) table this int8 one was quantized from. A few rows
        spread over the table are quantized now and must give this table's values exactly."""
        V = self.weight.size(0)
        some = torch.linspace(0, V - 1, min(V, 16)).long()  # (16,)
        same = source.shape == self.weight.shape
        if same:
            q, s = quantize_weight(source[some])
            same = torch.equal(q, self.weight[some]) and torch.equal(s, self.scale[some])
        if not same:
            raise ValueError("lookup_from: the float table is not the one this int8 table was quantized from")
        self.rows = source
        return self

    def int8_rows(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., D) int8
        if self.weight is not None:  # not packed, or no float table to read
            return super().int8_rows(ids)
        q, _ = quantize_weight(self.rows[ids.reshape(-1)])  # (N, D): the table's rows, as quantized at load
        return q.view(*ids.shape, -1)  # (..., D)

    def pack(self, kernel: str | None = None) -> "Int8TiedEmbedding":
        """Make the head's packed copy now: for `kernel`, or choose_kernel's choice (a no-op where there
        is none)."""
        if self.packed is not None:  # every project() calls pack(): nothing more to decide once packed
            return self
        kernel = kernel or choose_kernel(self.scale, self.rows_per_call, HEAD_ONEDNN_ROWS)
        if kernel is not None:
            q = self.weight
            if self.rows is not None:
                self.weight = None  # lookups read self.rows: the packed copy is the only int8 one
            if kernel == "onednn":
                self.packed = onednn_pack(q)
            else:
                qw, q = per_channel_qint8(q, self.scale.float()), None
                self.packed = fbgemm_prepack(qw, None)
            self.kernel = kernel
        return self

    def unpack(self) -> "Int8TiedEmbedding":
        """Bring the plain int8 table back (from the packed copy, exactly) and drop the packed copy and
        the float source: after loading or moving, the plain table is the one to use."""
        if self.weight is None and self.packed is not None:
            self.weight = unpack_weight(self.packed, self.kernel)
        self.packed = self.rows = None
        return self

    def project(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V)
        if self.pack().packed is not None:
            return packed_linear(h, self.packed, self.kernel, self.scale, None)
        return F.linear(h, self.weight.to(h.dtype)) * self.scale.to(h.dtype)  # weight-only int8

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:  # packed, lookups from the float source: the int8 table from the packed copy
            destination[prefix + "weight"] = unpack_weight(self.packed, self.kernel)
            destination.move_to_end(prefix + "scale")  # keep the order weight, scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:  # a load that leaves the table alone (load_model's) keeps the head packed
            self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # .to(), .cpu(), ...: the packed copy is rebuilt where the table lands
        self.unpack()
        return super()._apply(fn, recurse)


# ----------------------------------------------------------------------------- whole models


class Int8CrossKV:
    """Every decoder layer's cross-attention keys/values in int8, handed out a layer at a time: `kv[i]` is
    layer i's (k, v, k_scale, v_scale), k and v (Bs, H, S, Dh) the int8 numbers themselves, converted into one
    float32 buffer that every layer reuses, and the scales (Bs, H, 1, Dh) float32, which Attention.forward
    applies where they cost least. quantize_model sets the model's `cross_kv_int8` to this class;
    pegasus.DecoderCache builds one for greedy decoding while its buffer is small (cross_int8_bytes).

    One scale per (source, head, channel): quantize_weight's rule (symmetric, max |x| / 127, each number off by
    at most half a step) for each of the Dh channels over the source's S positions. Per channel, because
    then the scales leave the keys/values alone: q . (k * s) = (q * s) . k, and sum_j w_j (v_j * s) =
    (sum_j w_j v_j) * s, so they multiply the few query rows and outputs, (Bs, H, T, Dh), and a layer's
    conversion is one pass, a copy. Padded positions count too: an int8 model encodes each document alone,
    so there they hold the projections' biases (decoding.encode), and attention masks them out.

    A quarter of float32's bytes: 16 MiB where float32 took 63 (pegasus-xsum, one 505-token source). The
    conversion costs about what it saves while the buffer stays in the CPU's cache. Measured, Zen 4, 2 threads,
    16 layers in turn, one query row, 16 heads, with 14 MB streamed between layers (a layer's int8 weights), us
    a layer, float32 vs int8 (before 2026-12-07, when a second pass applied the scales in the buffer): 505 keys
    254 vs 221, 1,024 336 vs 339, 2,048 695 vs 803, 4,000 1,182 vs 2,440. Per channel, one pass: all 16 layers
    read in 1.0-1.7 ms where the second pass took 2.9-3.6, and built in 63-80 ms where a scale per head and
    position took 97-135 (505 tokens; the projections included)."""

    def __init__(self, layers, encoder_out: torch.Tensor):
        attn = layers[0].encoder_attn
        (Bs, S, _), H, Dh = encoder_out.shape, attn.n_heads, attn.head_dim
        new = functools.partial(torch.empty, device=encoder_out.device)
        self.q = new(len(layers), 2, Bs, H, S, Dh, dtype=torch.int8)  # (L, 2, Bs, H, S, Dh)
        self.scale = new(len(layers), 2, Bs, H, 1, Dh)  # (L, 2, Bs, H, 1, Dh) float32
        # Allocated before the projections, so that their scratch, freed above it, is not a hole it pins in the heap.
        self.buffer = new(2, Bs, H, S, Dh, dtype=encoder_out.dtype)  # (2, Bs, H, S, Dh): one layer's k and v
        for i, layer in enumerate(layers):  # one layer's float projections at a time, quantized in place
            for j, x in enumerate(layer.encoder_attn.project_kv(encoder_out)):  # (Bs, H, S, Dh): keys, then values
                # quantize_weight's rule along the positions (max |x| over dim -2, read down the projection's
                # columns): its rows would be a transposed copy of each projection.
                scale = int8_scale(torch.maximum(x.amax(-2, keepdim=True), -x.amin(-2, keepdim=True)))  # (Bs, H, 1, Dh)
                self.q[i, j].copy_(x.div_(scale).round_())  # (Bs, H, S, Dh) int8
                self.scale[i, j].copy_(scale)

    def __len__(self) -> int:
        return self.q.size(0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self.buffer.copy_(self.q[i])  # (2, Bs, H, S, Dh): integers, exact in float32
        (k, v), (k_scale, v_scale) = self.buffer, self.scale[i]
        return k, v, k_scale, v_scale


def quantize_int8(model: nn.Module, step_rows: int | None = None, prefix: str = "") -> nn.Module:
    """Replace every nn.Linear in `model` by an Int8Linear built from it, in place, and return the
    model. Each float layer is dropped as soon as its int8 twin exists (and, on CPU, is packed), so
    at most one layer is held twice: the peak is the float model plus one layer, never two models.
    The embedding and the output head are not nn.Linear modules: see int8_embedding_and_head.
    step_rows: see quantize_model (`prefix` is the module path of `model` in the recursion)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            m = Int8Linear.from_linear(child)
            m.rows_per_call = step_rows if per_step(prefix + name) else SOURCE_ROWS
            setattr(model, name, m.pack())  # the float child is freed here
        else:
            quantize_int8(child, step_rows, prefix + name + ".")
    return model


def int8_head(embedding: Int8Embedding, final_logits_bias: torch.Tensor | None = None) -> Int8Linear:
    """The tied output head h (..., D) -> logits (..., V) from an int8 embedding table: the same int8
    rows and scales, plus `final_logits_bias` (1, V) or (V,) (PEGASUS-X has none). On CPU the head
    packs its own copy for fbgemm and drops its reference to the table, which the embedding keeps."""
    V, D = embedding.weight.shape
    head = Int8Linear(D, V, final_logits_bias is not None, device="meta")
    head.weight, head.scale = embedding.weight, embedding.scale
    head.bias = None if final_logits_bias is None else final_logits_bias.detach().float().reshape(-1).clone()
    return head.pack()


def int8_embedding_and_head(shared_weight: torch.Tensor, final_logits_bias: torch.Tensor | None = None
                            ) -> tuple[Int8Embedding, Int8Linear]:
    """The tied token embedding (V, D) quantized once: an Int8Embedding for lookups and its int8_head."""
    embedding = Int8Embedding.from_weight(shared_weight)
    return embedding, int8_head(embedding, final_logits_bias)


def quantize_model(model: nn.Module, step_rows: int | None = None) -> nn.Module:
    """A Pegasus / PegasusX in int8, in place: every nn.Linear (quantize_int8) and the tied embedding
    and output head (Int8TiedEmbedding). On the meta device this builds the int8 skeleton that
    load_weights fills from a float checkpoint without building the float model.

    step_rows: the hypotheses each decoding step will run (batch x beams), where the caller knows it
    (the CLI). It is a hint for the kernels (choose_kernel): with AMX, the decoder's per-step matrices
    are packed for oneDNN from 16 rows and the output head from 8; the encoder's, and cross-attention's
    keys/values, which see every source position, are oneDNN's whatever step_rows is. With VNNI but no
    AMX only the output head is, from 16 rows. Such a model still decodes anything."""
    quantize_int8(model, step_rows)
    model.shared = Int8TiedEmbedding.from_embedding(model.shared)
    model.shared.rows_per_call = step_rows
    # Decoding's liberties (see Pegasus.__init__): int8 activations are not the reference's arithmetic anyway.
    model.encode_each = True
    model.cross_kv_int8 = Int8CrossKV  # greedy decoding's cross-attention keys/values (pegasus.DecoderCache)
    for layer in model.encoder.layers:  # the encoder's feed-forward over blocks of positions (see the module docstring)
        layer.ffn_rows = ENCODER_FFN_ROWS
    if bf16_supported():  # half the bytes per step; measured in tests/test_quantize.py
        model.kv_dtype = torch.bfloat16
    if bf16_supported() and cpu_has_amx():  # the encoder's attention on AMX's bfloat16 tiles (see the module docstring)
        set_attention_dtype(model.encoder, torch.bfloat16)
    return model


def pack_all(model: nn.Module) -> nn.Module:
    """Pack every int8 matrix of `model` now (the output head too), not on first use, each for the
    kernel choose_kernel gives it. A matrix is packed on one thread, so torch.get_num_threads()
    matrices are packed at once (the op releases Python's lock): at pegasus-xsum shape fbgemm's
    packing is ~3.8 s of one core. The
    quantized engine is a process-wide setting that fbgemm_pack sets and restores around each
    call; it is set here around all of them, so that no thread restores it while another packs."""
    matrices = [m for m in model.modules() if isinstance(m, (Int8Linear, Int8TiedEmbedding))]
    matrices.sort(key=lambda m: -m.scale.numel())  # the biggest (the head) first: threads finish together
    engine = torch.backends.quantized.engine
    if fbgemm_available():
        torch.backends.quantized.engine = "fbgemm"
    try:
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(lambda m: m.pack(), matrices))
    finally:
        torch.backends.quantized.engine = engine
    return model


def is_quantized(model: nn.Module) -> bool:
    return isinstance(model.shared, Int8TiedEmbedding)


def float_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A quantized model's state_dict with each int8 `X.weight` + `X.scale` pair replaced by the float32
    weight q * s it stands for: the names and tensors of a float checkpoint (what save_model writes)."""
    out = {}
    for name, t in state.items():
        base = name.removesuffix(".scale")
        if name.endswith(".scale") and state.get(base + ".weight", t).dtype == torch.int8:
            continue  # folded into its weight below
        if name.endswith(".weight") and t.dtype == torch.int8:
            t = dequantize(t, state[name.removesuffix("weight") + "scale"])  # (out, in) float32
        out[name] = t
    return out
