"""PEGASUS in one file: config, building blocks, and the encoder-decoder model.

PEGASUS (Zhang et al. 2020, "PEGASUS: Pre-training with Extracted Gap-sentences for Abstractive
Summarization", https://arxiv.org/abs/1912.08777) is a standard Transformer encoder-decoder
(Vaswani et al. 2017) with three details that matter for getting the published numbers:

  1. pre-LayerNorm residual blocks (LayerNorm *before* attention/FFN) plus a final LayerNorm
     after each stack, as in the original TensorFlow code (pegasus/layers/transformer_block.py);
  2. fixed sinusoidal positions with the sines in the first half of the vector and the cosines in
     the second half (not interleaved as in the Transformer paper);
  3. token embeddings scaled by sqrt(d_model), tied with the output projection, plus a
     `final_logits_bias` vector added to the logits.

Parameter names follow the Hugging Face checkpoint layout (`encoder.layers.0.self_attn.q_proj`,
...) so that `load_weights.py` is a short explicit map. Read top to bottom: config, positions,
attention, layers, model.
"""

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from memory import give_back_freed_memory, give_back_when_grown

# ----------------------------------------------------------------------------- config


@dataclass
class PegasusConfig:
    vocab_size: int = 96103  # 96,000 SentencePiece pieces + 103 reserved ids (see tokenizer.py)
    d_model: int = 1024  # width of every hidden state
    encoder_layers: int = 16  # number of encoder blocks
    decoder_layers: int = 16  # number of decoder blocks
    encoder_attention_heads: int = 16  # heads in encoder self-attention
    decoder_attention_heads: int = 16  # heads in decoder self- and cross-attention
    encoder_ffn_dim: int = 4096  # hidden width of the encoder feed-forward block
    decoder_ffn_dim: int = 4096  # hidden width of the decoder feed-forward block
    max_position_embeddings: int = 1024  # longest input/output the position table covers
    activation_function: str = "relu"  # FFN non-linearity; all published checkpoints use relu
    scale_embedding: bool = True  # multiply token embeddings by sqrt(d_model)
    dropout: float = 0.1  # on embeddings and residual branches (training only)
    attention_dropout: float = 0.0  # on attention probabilities (training only)
    activation_dropout: float = 0.0  # after the FFN non-linearity (training only)
    pad_token_id: int = 0  # <pad>; also the decoder start token
    eos_token_id: int = 1  # </s>
    decoder_start_token_id: int = 0  # first decoder input: PEGASUS reuses <pad>
    forced_eos_token_id: int = 1  # generation forces this at the last allowed step
    init_std: float = 0.02  # std of the normal init for fresh (untrained) weights
    tie_word_embeddings: bool = True  # output projection = token embedding (all published models)
    model_type: str = "pegasus"  # "pegasus" or "pegasus_x"; load_weights.py dispatches on it
    # Sinusoid frequencies: "reference" (the reference library's) or "original" (the TF code's, as the
    # checkpoints were trained); see sinusoids. PEGASUS-X ignores it: it always uses the original.
    position_formula: str = "reference"
    # The decoder's first input: the embedded start token (the reference) or, as the TF code feeds it, a
    # zero vector plus the position signal (pegasus/models/transformer.py: pad-then-shift in training,
    # `dec_Bx1xD *= (i > 0)` in predict). Set with position_formula by load_model(..., original=True).
    zero_first_decoder_input: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "PegasusConfig":
        """Build from a Hugging Face config.json dict; keys we do not use are ignored, and so is a null
        (the reference's "not set": our default applies). Wrong types and impossible shapes raise a
        ValueError naming the field: a "32" for d_model would otherwise fail deep inside the model."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object with the model's fields, got a {type(d).__name__}")
        kinds = {f.name: f.type for f in fields(cls)}
        for k, v in d.items():
            kind = kinds.get(k)
            if kind is None or v is None:
                continue
            ok = (isinstance(v, bool) if kind is bool else
                  isinstance(v, int) and not isinstance(v, bool) if kind is int else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if kind is float else
                  isinstance(v, kind))
            if not ok:
                raise ValueError(f"field {k!r} must be {kind.__name__}, got {v!r}")
        config = cls(**{k: v for k, v in d.items() if k in kinds and v is not None})
        config.check()
        return config

    def check(self):
        """Refuse values no model can be built from (ValueError naming the field)."""
        for k in REQUIRED_FIELDS:
            if getattr(self, k) < 1:
                raise ValueError(f"field {k!r} must be at least 1, got {getattr(self, k)}")
        for k in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, k):
                raise ValueError(f"d_model {self.d_model} is not divisible by {k} {getattr(self, k)}")
        for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            if not 0 <= getattr(self, k) < self.vocab_size:
                raise ValueError(f"field {k!r} = {getattr(self, k)} is not a token id below vocab_size "
                                 f"{self.vocab_size}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"field 'activation_function' {self.activation_function!r} is not one of "
                             f"{', '.join(ACTIVATIONS)}")
        for k in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0 <= getattr(self, k) < 1:
                raise ValueError(f"field {k!r} must be in [0, 1), got {getattr(self, k)}")


# The shape fields: at least 1 each. Every published config.json has them (load_weights.py requires them).
REQUIRED_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                   "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")


# The published checkpoints (from their config.json files; ../shared/configs/published.json).
# All share vocab 96,103, relu, scaled embeddings, pad=start=0, eos=1.
#
#   checkpoint                    d_model layers heads ffn   positions  params  generation
#   google/pegasus-xsum           1024    16+16  16    4096  512        568M    beam 8, lp 0.6, max 64
#   google/pegasus-cnn_dailymail  1024    16+16  16    4096  1024       568M    beam 8, lp 0.8, 32..128
#   google/pegasus-large          1024    16+16  16    4096  1024       568M    beam 8, lp 0.8, max 256
#   google/pegasus-x-base         768     12+12  12    3072  16384      272M    beam 8, lp 0.8 (pegasus_x.py)
#   google/pegasus-x-large        1024    16+16  16    4096  16384      568M    beam 8, lp 0.8 (pegasus_x.py)
PUBLISHED = {
    "google/pegasus-xsum": PegasusConfig(max_position_embeddings=512),
    "google/pegasus-cnn_dailymail": PegasusConfig(),
    "google/pegasus-large": PegasusConfig(),
}

# The feed-forward's non-linearity, applied to fc1's fresh output, which nothing else holds: relu (every published
# checkpoint's) overwrites it in place, one d_ffn-wide tensor less (8 MB at 505 tokens); the same floats.
ACTIVATIONS = {"relu": F.relu_, "gelu": F.gelu, "silu": F.silu, "swish": F.silu,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


# ----------------------------------------------------------------------------- positions


def sinusoids(n_positions: int, dim: int, formula: str = "reference") -> torch.Tensor:
    """The fixed PEGASUS position table, (n_positions, dim).

    The layout follows the original PEGASUS/tensor2tensor code: all sines first, then all cosines
    [sin(p*w_0) .. sin(p*w_{N-1}) | cos(p*w_0) .. cos(p*w_{N-1})], N = dim/2, rather than
    interleaving sin/cos per pair as the Transformer paper does. Two spacings of the frequencies:

        "reference"  w_i = 10000^(-2i/dim) = 10000^(-i/N)        the reference library's port, and the
                     tables stored in its converted checkpoints (load_weights.py checks them against it)
        "original"   w_i = 10000^(-i/(N-1))                       the TF code the checkpoints were
                     trained with (pegasus/layers/timing.py: exp(-i * log(1e4) / max(N-1, 1)))

    "original" runs from 1 down to exactly 1/10000; "reference" stops one step short. The difference
    grows with the position: at dim 1024 the largest phase error, p*|w_i - w'_i| (at i = 56), is
    0.046 rad at position 64, 0.37 rad at 512 and 0.74 rad at 1024 (0.061 / 0.98 rad at 64 / 1024
    for dim 768). The reference's converter drops the stored table and rebuilds it with its own
    formula, so every converted checkpoint runs with positions a little off those it was trained
    with; the default follows the reference (so its outputs are reproduced bit for bit) and
    "original" is opt-in. PEGASUS-X (pegasus_x.py) always uses the original spacing.

    Computed in float64 and rounded once, as the reference does (exact at large positions). The TF
    code computed in float32; its table differs from the exact one by at most 1e-4 at dim 1024 up
    to position 1024, far below the 0.74 rad above.
    """
    half = dim // 2 + dim % 2  # sines get the extra slot when dim is odd
    i = torch.arange(half, dtype=torch.float64)  # (half,)
    if formula == "reference":
        inv_freq = 10000.0 ** (-2.0 * i / dim)  # (half,)
    elif formula == "original":
        inv_freq = 10000.0 ** (-i / max(dim // 2 - 1, 1))  # (half,); max(., 1) as timing.py, for dim 2
    else:
        raise ValueError(f"unknown position formula {formula!r}; use 'reference' or 'original'")
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (P, half)
    return torch.cat([angles.sin(), angles[:, : dim // 2].cos()], dim=-1).float()  # (P, dim)


# ----------------------------------------------------------------------------- masks
# Boolean masks say which keys a query may attend to (True = may), shaped to broadcast against
# attention scores (B, H, T, S).


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) with 1 for tokens, 0 for padding -> (B, 1, 1, S): no query attends to a padded key."""
    return attention_mask[:, None, None, :].bool()


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """(B, S) with 1 for tokens, 0 for padding -> each row's length, where every row is a prefix of ones (padding on
    the right, as tokenizer.py pads); None where a row has padding elsewhere (positions would not be a prefix)."""
    lengths = attention_mask.sum(1)  # (B,)
    prefix = torch.arange(attention_mask.size(1), device=lengths.device) < lengths[:, None]  # (B, S)
    return lengths.tolist() if bool((attention_mask.bool() == prefix).all()) else None


def causal_mask(T: int, device) -> torch.Tensor:
    """(T, T): query t attends to positions 0..t (teacher forcing: a token never sees its future)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def cache_mask(input_pos: torch.Tensor, n: int) -> torch.Tensor:
    """(T, n) for queries at positions input_pos (T,) over the n filled slots of a KV cache: query t
    may see slots 0..input_pos[t] (causal among the new tokens)."""
    return torch.arange(n, device=input_pos.device)[None, :] <= input_pos[:, None]


# ----------------------------------------------------------------------------- attention


class KVCache:
    """A preallocated key/value buffer for decoder self-attention (the gpt-fast design).

    Each decoding step writes its new keys/values at `input_pos` instead of concatenating, so no
    step allocates or copies the past. Attention reads only the `length` slots filled so far: a
    step at position t attends t+1 keys, not the whole buffer (at t = 10 of 64, six times less
    work), and one new token needs no mask. Beam search moves hypotheses between rows
    (DecoderCache.reorder), copying only the rows that need it.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, H, S, Dh) each: S slots, preallocated (DecoderCache makes them)
        self.buffers = (k, v)  # the whole allocation, L slots; k and v may view it as fewer (lay_out)
        self.length = 0  # slots filled, set by DecoderCache.advance before each step
        self.read = 0  # slots attention reads: `length`, or rounded up to a whole block (DecoderCache.advance)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))  # write (B, H, T, Dh) at input_pos, in the cache's dtype
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:, :, : self.read], self.v[:, :, : self.read]  # (B, H, read, Dh)

    def lay_out(self, slots: int):
        """View the buffers as (B, H, slots, Dh), contiguous: the first B*H*slots*Dh elements of each (the
        values in them are not moved, so this is only for buffers about to be written: move)."""
        if self.k.size(2) != slots:
            B, H, _, Dh = self.buffers[0].shape
            self.k, self.v = (b.view(-1)[: B * H * slots * Dh].view(B, H, slots, Dh) for b in self.buffers)

    def move(self, slots: int, spare: "KVCache"):
        """The filled slots, written into `spare`'s buffers laid out for `slots` slots, which then trade places
        with ours (DecoderCache.advance lays the cache out anew: attention's matmuls read it contiguous).
        Writing into a buffer that already exists matters on the CPU: a fresh 8 MB tensor per layer (beam 8,
        batch 4) costs page faults that took longer than the copy itself."""
        n = self.length
        spare.lay_out(slots)
        for src, dst in ((self.k, spare.k), (self.v, spare.v)):
            dst[:, :, :n].copy_(src[:, :, :n])
        self.k, self.v, self.buffers, spare.k, spare.v, spare.buffers = (
            spare.k, spare.v, spare.buffers, self.k, self.v, self.buffers)


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), on which oneDNN's bfloat16 and
    int8 matmuls run; it changes which bfloat16 attention path is faster (Attention.attend)."""
    try:
        return torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a PyTorch without the probe: the paths made for every other CPU
        return False


class Attention(nn.Module):
    """Multi-head attention, used for encoder self-attention, decoder self-attention (with a
    KV cache) and decoder cross-attention (keys/values from the encoder).

    Two code paths compute the same thing: PyTorch's fused scaled_dot_product_attention (the
    default; FlashAttention/memory-efficient kernels on GPU) and the plain math, which is easier
    to read and can keep the attention weights for plotting (`keep_weights=True`). The
    `attention_mode` context manager below switches a whole model between them.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        assert d_model % n_heads == 0, f"d_model {d_model} is not divisible by {n_heads} heads"
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.use_sdpa = True  # False: plain-math path
        self.keep_weights = False  # math path only: store softmax weights in self.weights
        self.weights = None
        # A liberty of reduced precision, never float32's (quantize_model sets it for the int8 encoder on a CPU with
        # AMX): softmax(q k^T) v computed in this dtype, the output cast back. None: in the inputs' dtype.
        self.compute_dtype: torch.dtype | None = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, source: torch.Tensor):
        """Keys and values of a source sequence, (B, H, S, Dh) each. For cross-attention this runs
        once per source document; all beams of that document then share the result."""
        return self.split_heads(self.k_proj(source)), self.split_heads(self.v_proj(source))

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(Dh)) v for queries (B, H, T, Dh) and keys/values (B, H, S, Dh), mask
        boolean (True = may attend) or additive. Returns (out, the weights on the math path, else None)."""
        cd = self.compute_dtype
        if cd is not None and q.dtype != cd:
            mask = mask.to(cd) if mask is not None and mask.is_floating_point() else mask  # an additive one too
            out, w = self.attend(q.to(cd), k.to(cd), v.to(cd), mask)
            return out.to(q.dtype), w
        p = self.dropout if self.training else 0.0
        # A decoding step's few bfloat16 query rows: without AMX, PyTorch's fused CPU kernel is 4-9x slower than
        # the math below (1 row, 505 keys, 16 heads: 1.2 ms vs 0.13 ms; float32 fused: 0.17 ms; torch 2.13, Zen 4).
        # With AMX its tile matmuls make it the faster one for up to 8 rows in all (1 row, 505 keys: 39 vs 101 us;
        # 8 rows: 113 vs 141), but not for many hypotheses at once (32 x 1 row, 64 keys: 480 vs 372; Xeon).
        slow_fused = (q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.size(-2) <= 8
                      and not (cpu_has_amx() and q.size(0) * q.size(-2) <= 8))
        if self.use_sdpa and not self.keep_weights and not slow_fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        # Scaling the queries rather than the scores: fewer numbers (T*Dh, not T*S), and with Dh = 64 the
        # scale is 1/8, a power of two, so the scores are the same to the bit. Masks are applied in place.
        scores = (q * (1 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)  # (B, H, T, S)
        if mask is not None and mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        elif mask is not None:  # additive (see Pegasus.decode)
            scores += mask
        w = scores.softmax(dim=-1)
        return F.dropout(w, p, self.training) @ v, w.detach()  # (B, H, T, Dh)

    def forward(self, x, kv=None, mask=None, cache: KVCache | None = None, input_pos=None):
        """x: (B, T, D) queries. kv: precomputed keys/values for cross-attention, else self-attention: (k, v);
        or (k, v, k_scale, v_scale), int8's integers and their scales (quantize.Int8CrossKV); or PerSource,
        each source's (k, v) at its own length (DecoderCache). mask: boolean (True = may attend) or additive,
        broadcastable to (B, H, T, S)."""
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        if kv is None:
            k, v = self.project_kv(x)  # (B, H, T, Dh)
            if cache is not None:
                k, v = cache.update(input_pos, k, v)  # (B, H, n, Dh): the n filled slots
            kv = (k, v)
        if isinstance(kv, PerSource):  # each source's hypotheses (consecutive rows) against its own keys, unpadded
            rows, outs, weights = x.size(0) // len(kv), [], []
            for q_s, kv_s in zip(q.split(rows), kv):
                outs.append(self.attend_heads(q_s, kv_s, None))  # (rows, T, D)
                weights.append(self.weights)
            self.weights = weights if self.keep_weights else None  # one per source: their key lengths differ
            return self.out_proj(torch.cat(outs))  # (B, T, D)
        return self.out_proj(self.attend_heads(q, kv, mask))  # (B, T, D)

    def attend_heads(self, q, kv, mask):
        """Queries (B, H, T, Dh) against keys/values kv (as in forward, one source's or a batch's) -> the heads'
        outputs side by side, (B, T, D), in the queries' dtype."""
        (B, H, T, Dh), dtype = q.shape, q.dtype
        k, v, *scales = kv
        # Beam search runs B = n_src * n_beams hypotheses against n_src encoder outputs. Rather
        # than copying each source's keys/values n_beams times, fold the beams into the query
        # axis: beams of one source are just more queries against the same keys.
        group = B // k.size(0)
        if group > 1:
            q = q.view(k.size(0), group, H, T, Dh).transpose(1, 2)  # (Bs, H, G, T, Dh)
            q = q.reshape(k.size(0), H, group * T, Dh)  # (Bs, H, G*T, Dh)
        if scales:
            # int8 keys/values come with scales per channel, (B', H, 1, Dh): q . (k * s) = (q * s) . k and
            # w (v * s) = (w v) * s, so they go on the queries and the output.
            q = q * scales[0]  # (B', H, T', Dh)
        out, w = self.attend(q.to(k.dtype), k, v, mask)  # (B', H, T', Dh) (k, v narrower: see DecoderCache)
        out = out.to(dtype)
        if scales:
            out = out * scales[1]
        self.weights = w if self.keep_weights else None
        if group > 1:
            out = out.view(k.size(0), H, group, T, Dh).transpose(1, 2)  # (Bs, G, H, T, Dh)
        return out.reshape(B, H, T, Dh).transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, D)


def set_attention_mode(model: nn.Module, *, sdpa: bool = True, keep_weights: bool = False):
    """Run every Attention of `model` on the fused kernel (sdpa=True) or the plain math (sdpa=False);
    with keep_weights=True (math path) each module stores its softmax weights in `.weights`. The
    defaults are the default mode. `attention_mode` does the same for one `with` block."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.use_sdpa, m.keep_weights = sdpa, keep_weights


def set_attention_dtype(module: nn.Module, dtype: torch.dtype | None):
    """Compute every Attention of `module` in `dtype` (Attention.compute_dtype; None: the inputs' dtype)."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.compute_dtype = dtype


@contextmanager
def attention_mode(model: nn.Module, *, sdpa: bool = True, keep_weights: bool = False):
    """set_attention_mode inside the `with` block, the previous modes back on exit (weights kept
    in the block stay readable after it). The shape of Whisper's `disable_sdpa`, per model
    instead of process-wide."""
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [(m.use_sdpa, m.keep_weights) for m in modules]
    set_attention_mode(model, sdpa=sdpa, keep_weights=keep_weights)
    try:
        yield modules
    finally:
        for m, (use_sdpa, keep) in zip(modules, saved):
            m.use_sdpa, m.keep_weights = use_sdpa, keep


# ----------------------------------------------------------------------------- layers


class EncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN(x)), then x + FFN(LN(x)).

    Normalising the *input* of each sub-block (rather than the residual sum, as in the original
    Transformer) keeps gradients well-behaved in deep stacks; PEGASUS then needs one extra
    LayerNorm at the very end of each stack (`Stack.layer_norm`)."""

    attention = Attention  # the self-attention module (PEGASUS-X's encoder layer swaps in its own)
    ffn_rows: int | None = None  # feed-forward over blocks of at most this many positions (quantize_model sets it)

    def __init__(self, cfg: PegasusConfig, d_ffn: int, n_heads: int, bias: bool = True):
        super().__init__()
        d = cfg.d_model
        self.self_attn = self.attention(d, n_heads, cfg.attention_dropout, bias=bias)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, d_ffn), nn.Linear(d_ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def residual(self, x, branch):
        # The sum written into the branch's own output, a tensor no one else holds (x + b and b + x are the same
        # floats): one (B, T, D) tensor less for the allocator to place each time. Under autocast the branch is
        # narrower than x, and the sum must be x's dtype.
        branch = F.dropout(branch, self.dropout, self.training)
        return branch.add_(x) if branch.dtype == x.dtype else x + branch

    def feed_forward(self, x):
        if self.ffn_rows and x.size(1) > self.ffn_rows:  # (B, S, D) a block of positions at a time: see quantize_model
            return torch.cat([self.feed_forward(block) for block in x.split(self.ffn_rows, 1)], 1)
        h = self.act(self.fc1(self.final_layer_norm(x)))  # (B, T, d_ffn): the largest activation (ACTIVATIONS)
        h = F.dropout(h, self.activation_dropout, self.training)
        x = self.residual(x, self.fc2(h))
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            big = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-big, big)
        return x

    def forward(self, x, mask):
        x = self.residual(x, self.self_attn(self.self_attn_layer_norm(x), mask=mask))
        return self.feed_forward(x)


class DecoderLayer(EncoderLayer):
    """Causal self-attention (cached), then cross-attention to the encoder, then the FFN."""

    def __init__(self, cfg: PegasusConfig, d_ffn: int, n_heads: int, bias: bool = True):
        super().__init__(cfg, d_ffn, n_heads, bias)
        self.encoder_attn = Attention(cfg.d_model, n_heads, cfg.attention_dropout, bias=bias)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, mask, cross_kv=None, cross_mask=None, cache=None, input_pos=None):
        x = self.residual(x, self.self_attn(self.self_attn_layer_norm(x), mask=mask, cache=cache,
                                            input_pos=input_pos))
        if cross_kv is not None:  # skipped when the decoder runs alone as a language model
            x = self.residual(x, self.encoder_attn(self.encoder_attn_layer_norm(x), kv=cross_kv, mask=cross_mask))
        return self.feed_forward(x)


class Stack(nn.Module):
    """A list of layers and the final LayerNorm (named `layers` / `layer_norm` as in checkpoints)."""

    def __init__(self, layers: list[nn.Module], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(d_model)


class PerSource(list):
    """One layer's cross-attention keys/values as a list of (k, v), (1, H, S_i, Dh) each: every source at its
    own length, no padding, so no mask (DecoderCache builds it for a padded batch in a narrower dtype; Attention
    runs each source's hypotheses against its own). A type of its own so that Attention.forward can tell it
    from one (k, v) pair for the whole batch."""


class DecoderCache:
    """What the decoder keeps between steps: cross-attention keys/values, computed once per source
    document (shared by all its beams), and one self-attention KVCache per layer."""

    # Source length (keys each query reads: the batch's padded width) from which greedy reads narrower keys/values.
    # Below it float32's fused kernel reads float32 faster than the math reads bfloat16 (one query row, 16 heads,
    # Zen 4, 2 threads, us: 512 keys 88 vs 161, 2048 381 vs 394); past it the bytes decide (4096 keys 2153 vs
    # 1063, 8192 4020 vs 1944). PEGASUS-X int8 greedy, 63 steps after the encoder (Zen 4, alternating processes):
    # 16,384 tokens 7.3-8.7 -> 3.6-4.9 s and 1.86 -> 1.35 GB; 4,096 level (0.05 GB less); pegasus-xsum's 505
    # tokens would lose (1.22-1.39 -> 1.37-1.53 s).
    long_source = 4096
    # An int8 model's greedy decoding keeps its cross-attention keys/values in int8 (model.cross_kv_int8,
    # quantize.Int8CrossKV) while one layer's, as float32, take at most this many bytes: the buffer each layer
    # is converted into at each step then stays in the CPU's cache (Int8CrossKV measures where converting stops
    # paying for itself). At pegasus-xsum's width: 1,024 keys in all (sources x padded length).
    cross_int8_bytes = 8 << 20

    def __init__(self, model: "Pegasus", encoder_out, attention_mask, n_hyps: int, max_len: int):
        cfg = model.config
        layers = model.decoder.layers
        # Narrower keys/values (model.kv_dtype) pay where several hypotheses read each source (beam search):
        # half the bytes per step. With one query per source (greedy) float32's fused kernel is faster, except
        # with AMX, where the fused kernel reads bfloat16 fastest (Attention.attend; int8 greedy 1.97-2.19 -> 1.92-1.99
        # s, Xeon), and for long sources (long_source).
        self.on_cpu = model.device.type == "cpu"
        shared = encoder_out is not None and n_hyps > encoder_out.size(0)
        long = encoder_out is not None and encoder_out.size(1) >= self.long_source
        narrow = model.kv_dtype is not None and (shared or long or (self.on_cpu and cpu_has_amx()))
        kv_dtype = model.kv_dtype if narrow else model.dtype
        # An int8 model's greedy decoding on the CPU, where its keys/values would be float32: int8 cross-attention
        # keys/values instead (quantize.Int8CrossKV: a quarter of the bytes), while one layer's fit
        # cross_int8_bytes. Not for beam search: its bfloat16 keys/values converted from int8 at every layer and
        # step took 4 documents' beam 8 (pegasus-xsum shape, Zen 4, 2 threads) from 7.8-8.8 to 9.2-9.8 s in one
        # process (the fastest and the median of 5 rounds), for a peak 50-70 MiB lower (README: "Near the line, and
        # why").
        int8_cross = (model.cross_kv_int8 is not None and encoder_out is not None and self.on_cpu and not shared
                      and not narrow and 2 * encoder_out.numel() * kv_dtype.itemsize <= self.cross_int8_bytes)
        # A padded batch in a narrower dtype (a liberty float32 never takes: its sums over the padded width are the
        # reference's): every source's keys/values at its own length (PerSource), no memory or work spent on padding.
        # Int8 beam 8 over 4 documents of 505-313 tokens (pegasus-xsum shape): 102 MiB of keys/values, not 126.
        lengths = None if attention_mask is None or not narrow else self.source_lengths(attention_mask)
        # bfloat16 attention on the CPU runs on oneDNN matmuls (Attention.attend), and oneDNN builds and keeps
        # a kernel for every new shape: one per key length, so 64 steps grew the process by ~1.3 MB a step
        # (int8 beam 8 over 4 documents, Zen 4). Self-attention reading whole blocks of 16 slots, the unfilled
        # ones masked out, makes 4 shapes where there were 64. float32 reads exactly the filled slots (bit for bit).
        self.block = 16 if kv_dtype == torch.bfloat16 and self.on_cpu else 1
        H, Dh = cfg.decoder_attention_heads, cfg.d_model // cfg.decoder_attention_heads
        self.cross_kv = None  # decoder-only use has no source
        # The heap's free pages go back to the system (memory.py) twice while the cache is built: first what
        # encoding freed, then what the key/value projections freed. glibc keeps both resident for reuse, but
        # each block below is a mapping of its own and a step needs far less, so kept they sat beside the
        # cache at the process's peak. Int8, beam 8 over 4 documents, pegasus-xsum shape (Zen 4, 2 threads,
        # MiB): the projections' 65 of scratch stayed resident while the self-attention block was zeroed,
        # 1,219 at the peak while building, 1,120 with the second call here (1,104 resident after either way).
        give_back_freed_memory()
        if encoder_out is not None:
            # Every layer's cross-attention keys/values in one block, contiguous (every step reads all of them),
            # written a layer at a time. As 2 tensors per layer they came from the heap, between the projections
            # freed after each one was copied, and the heap kept those too: 319 MB for 132 MB of bfloat16 keys
            # and values (int8, beam 8 over 4 documents, Zen 4); one large block is a mapping of its own.
            if int8_cross:
                self.cross_kv = model.cross_kv_int8(layers, encoder_out)
            elif lengths is not None:
                self.cross_kv = self.per_source(layers, encoder_out, lengths, kv_dtype)
            else:
                kv = torch.empty(len(layers), 2, encoder_out.size(0), H, encoder_out.size(1), Dh, dtype=kv_dtype,
                                 device=model.device)  # (L, 2, Bs, H, S, Dh)
                for (k, v), layer in zip(kv, layers):
                    k_new, v_new = layer.encoder_attn.project_kv(encoder_out)  # (Bs, H, S, Dh) each
                    k.copy_(k_new), v.copy_(v_new)
                self.cross_kv = [(k, v) for k, v in kv]
            give_back_freed_memory()
        # (Bs, 1, 1, S), boolean or added (added_mask)
        self.cross_mask = None if attention_mask is None or lengths else self.added_mask(padding_mask(attention_mask))
        # Every layer's self-attention keys/values, and the spare pair a move writes into (advance), in one
        # block. Not zeroed: only filled slots are read (zeroing took ~0.4 s of an 8 s int8 beam 8 over 4
        # documents), but where attention reads whole blocks of slots the unfilled ones, masked out, must
        # still hold finite values: a weight of 0 times NaN is NaN, and the fused kernel adds the mask to the
        # scores, where -inf + NaN is NaN (the math's masked_fill overwrites them). So they are zeroed then.
        kv = torch.empty(len(layers) + 1, 2, n_hyps, H, max_len, Dh, dtype=kv_dtype, device=model.device)
        if self.block > 1:
            kv.zero_()
        *self.self_kv, self.spare = [KVCache(k, v) for k, v in kv]  # (n_hyps, H, max_len, Dh) each
        self.self_block, self.max_len = kv, max_len
        # Which row of the self-attention cache holds which hypothesis (reorder): None while row i holds
        # hypothesis i, else a tensor (n_hyps,), row_of[i] = the row of hypothesis i.
        self.row_of = None
        self.group = n_hyps // (1 if encoder_out is None else encoder_out.size(0))  # rows a source's beams keep to

    @staticmethod
    def source_lengths(attention_mask: torch.Tensor) -> list[int] | None:
        """Each source's length where the batch is right-padded, has padding and no empty source; else None (the
        padded layout)."""
        lengths = right_padded_lengths(attention_mask)
        if lengths is None or min(lengths) == 0 or min(lengths) == attention_mask.size(1):
            return None
        return lengths

    def per_source(self, layers, encoder_out: torch.Tensor, lengths: list[int], dtype: torch.dtype) -> list[PerSource]:
        """Every layer's cross-attention keys/values for each source at its own length (PerSource), from the padded
        states (Bs, S, D): one block for all (as the padded layout), each source's (H, S_i, Dh) contiguous in it."""
        H = layers[0].encoder_attn.n_heads
        Dh = encoder_out.size(2) // H
        block = torch.empty(len(layers), 2, sum(lengths) * H * Dh, dtype=dtype, device=encoder_out.device)
        cross_kv = []
        for (k_all, v_all), layer in zip(block, layers):  # (sum_i S_i * H * Dh,) each
            pairs, start = PerSource(), 0
            for i, n in enumerate(lengths):
                k, v = (t[start: start + n * H * Dh].view(1, H, n, Dh) for t in (k_all, v_all))  # (1, H, S_i, Dh)
                k_new, v_new = layer.encoder_attn.project_kv(encoder_out[i: i + 1, :n])  # (1, H, S_i, Dh) each
                k.copy_(k_new), v.copy_(v_new)
                pairs.append((k, v))
                start += n * H * Dh
            cross_kv.append(pairs)
        return cross_kv

    def advance(self, input_pos: torch.Tensor) -> torch.Tensor | None:
        """Before a step writes positions input_pos (T,): sets the slots filled once it has (one host
        sync per step, not one per layer) and those attention reads, and returns the self-attention
        mask over the slots read, (T, read): None where one new token may see every slot read."""
        if self.on_cpu:  # what the last step's tensors faulted back in of the heap's free pages (memory.py)
            give_back_when_grown()
        n = int(input_pos.max()) + 1
        if n > self.max_len:
            raise ValueError(f"position {n - 1} is past the decoder cache's {self.max_len} slots")
        read = min(-(-n // self.block) * self.block, self.max_len)  # n rounded up to a whole block
        for c in self.self_kv:
            if self.block > 1 and c.k.size(2) != read:
                # Whole blocks: lay the cache out as exactly the slots read, (B, H, read, Dh) contiguous, moving the
                # filled ones (at the first step and every `block` steps after). A view of fewer slots than the
                # buffer holds is not contiguous, and the CPU's bfloat16 matmul copies such an operand, transposed,
                # at every step: 1.0 ms vs 0.42 ms for 32 hypotheses reading 32 slots (Zen 4, 2 threads).
                c.move(read, self.spare)
            c.length, c.read = n, read
        return cache_mask(input_pos, read) if len(input_pos) > 1 or read > n else None

    def added_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The cross-attention mask as attention over bfloat16 keys on the CPU reads it fastest: added (0 or
        -inf, in bfloat16), the same scores to the bit as masked_fill and ~3x faster (the math path of
        Attention.attend: 0.04 vs 0.11-0.14 ms a layer for beam 8 over 4 documents, Zen 4). Only here: every
        key of the source is finite, where the self-attention cache's unfilled slots may hold anything, which
        masked_fill overwrites and an addition would not. float32 keeps the boolean mask, as the reference."""
        if self.block == 1:
            return mask
        return torch.zeros(mask.shape, dtype=torch.bfloat16, device=mask.device).masked_fill_(~mask, float("-inf"))

    def reorder(self, idx: torch.Tensor):
        """Beam search: hypothesis i continues from hypothesis idx[i]. Rather than moving every row into place
        (row i := row idx[i]), hypotheses move between rows: a parent's first child takes over its row as it is,
        and each further child takes the row of a hypothesis that has no child, into which its parent's filled
        slots are copied (a row that stays a parent's is never written, so the copies can go in place). Rows of
        one source stay its rows (cross-attention reads each source's rows as a group). Beam 8 over 4 documents
        (pegasus-xsum shape, random weights): ~11 of 32 rows copied a step where the move wrote 32; decode
        permutes its inputs into row order and its outputs back (to_rows, to_hypotheses)."""
        parents, n = idx.tolist(), len(idx)
        old = list(range(n)) if self.row_of is None else self.row_of.tolist()
        new, kept = [None] * n, set()
        for i, p in enumerate(parents):  # first children keep their parent's row
            if old[p] not in kept:
                new[i] = old[p]
                kept.add(old[p])
        free = [r for r in range(n) if r not in kept]  # rows of hypotheses without children
        copies = []
        for i, p in enumerate(parents):  # further children: a free row of their source, a copy of the parent's
            if new[i] is None:
                new[i] = next(r for r in free if r // self.group == i // self.group)
                free.remove(new[i])
                copies.append((old[p], new[i]))
        if copies:
            # Every layer's keys and values (and the spare's, unused) as rows, in the layout they all share
            # (DecoderCache.advance lays every layer out alike): one copy per row moves it in all layers at once.
            c = self.self_kv[0]
            L, H, S, Dh = self.self_block.size(0), c.k.size(1), c.k.size(2), c.k.size(3)
            rows = self.self_block.view(L, 2, -1)[:, :, : n * H * S * Dh].view(L, 2, n, H, S, Dh)[..., : c.length, :]
            for src, dst in copies:
                rows[:, :, dst].copy_(rows[:, :, src])  # (L, 2, H, length, Dh)
        self.row_of = None if new == list(range(n)) else torch.tensor(new, device=idx.device)  # (n,) hypothesis -> row

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(n_hyps, ...) in hypothesis order -> in cache row order (row r's input is its hypothesis's)."""
        return x if self.row_of is None else x[self.row_of.argsort()]  # argsort of a permutation: its inverse

    def to_hypotheses(self, x: torch.Tensor) -> torch.Tensor:
        """(n_hyps, ...) in cache row order -> in hypothesis order."""
        return x if self.row_of is None else x[self.row_of]


# ----------------------------------------------------------------------------- model


class TiedEmbedding(nn.Embedding):
    """The token embedding, whose matrix is also the output projection (tied weights; Press & Wolf
    2017): forward maps ids to vectors, `project` maps vectors to one score per token.
    onednn.PackedTiedEmbedding replaces `project` with a packed matmul (same numbers)."""

    def reset_parameters(self):
        # Pegasus._init_weights initialises the table. On the meta device (load_weights builds the
        # skeleton there) there is nothing to fill, and PyTorch's meta normal_ first imports its
        # reference decompositions: ~2.5 s of a process's start, for nothing.
        if not self.weight.is_meta:
            super().reset_parameters()

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)  # (..., D) -> (..., V)


class Pegasus(nn.Module):
    """The encoder-decoder with its LM head (what the reference calls
    PegasusForConditionalGeneration). `model(input_ids, attention_mask, decoder_input_ids)`
    returns logits (B, T, V); `encode` / `decode` / `logits` are its three parts, which
    decoding.py calls one step at a time."""

    attention_bias = True  # q/k/v/out projections have biases (PEGASUS-X drops them)
    logits_bias = True  # the checkpoints have a final_logits_bias (PEGASUS-X's have none)

    def __init__(self, config: PegasusConfig):
        super().__init__()
        cfg = self.config = config
        if not cfg.tie_word_embeddings:
            raise ValueError("untied input/output embeddings are not supported (no published PEGASUS uses them)")
        self.shared = TiedEmbedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.encoder = self.build_encoder(cfg)
        self.decoder = Stack([DecoderLayer(cfg, cfg.decoder_ffn_dim, cfg.decoder_attention_heads, self.attention_bias)
                              for _ in range(cfg.decoder_layers)], cfg.d_model)
        # A learned per-token bias on the logits. The original TF code had none; it exists in the
        # converted checkpoints (inherited from BART's code) and is all zeros in the published
        # ones, but fine-tuned models may learn it, so it is loaded and applied. A None buffer is
        # no tensor at all (not in state_dict): what PEGASUS-X, whose checkpoints have none, gets.
        self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size) if self.logits_bias else None)
        self.generation_config: dict = {}  # the checkpoint's decoding defaults; filled by load_weights.py
        self.grad_checkpoint = False  # True: recompute each layer's activations in backward (train.py sets it)
        # Liberties decoding may take with reduced precision, never with the float32 default (the reference's
        # arithmetic, bit for bit). Set by quantize_model (kv_dtype where oneDNN has bf16) and load_model(bf16 on CPU).
        # (A third, per Attention module: compute_dtype, the int8 encoder's attention in bf16 on AMX CPUs.)
        self.kv_dtype: torch.dtype | None = None  # decoding's attention keys/values in this dtype (None: the model's)
        self.encode_each = False  # encode each document of a padded batch alone, at its own length (decoding.encode)
        self.cross_kv_int8 = None  # greedy decoding's int8 cross-attention keys/values: quantize.Int8CrossKV, or None
        self.init_buffers()
        if not self.shared.weight.is_meta:  # meta: shapes only (see TiedEmbedding.reset_parameters)
            self.apply(self._init_weights)

    def build_encoder(self, cfg: PegasusConfig) -> Stack:  # PEGASUS-X builds its own
        return Stack([EncoderLayer(cfg, cfg.encoder_ffn_dim, cfg.encoder_attention_heads, self.attention_bias)
                      for _ in range(cfg.encoder_layers)], cfg.d_model)

    @classmethod
    def check_dtype(cls, dtype: torch.dtype, force: bool = False):
        """Raise for a weight dtype the model does not support: PEGASUS runs in all (PEGASUS-X overrides this)."""

    def init_buffers(self):
        """Buffers that are computed, not loaded (called again after loading on the meta device)."""
        cfg = self.config
        if self.device.type == "meta":  # a skeleton to load into (load_weights): this runs again after loading,
            # and computing on meta would first import PyTorch's decompositions (~2-4 s) for nothing
            table = torch.empty(cfg.max_position_embeddings, cfg.d_model, device="meta")
        else:
            table = sinusoids(cfg.max_position_embeddings, cfg.d_model, cfg.position_formula)  # (P, D)
        self.register_buffer("embed_positions", table, persistent=False)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            # The decoder start token is <pad> (id 0): its embedding starts at zero, so the first
            # decoder input carries only its position signal.
            nn.init.zeros_(m.weight[m.padding_idx])

    # The activations' dtype and the model's device, read from the decoder's final LayerNorm: a float
    # tensor in every variant, where `shared.weight` is int8 in a quantized model (quantize.py).
    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.layer_norm.weight.device

    def positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Position vectors for the integer positions `pos`, (T,) -> (T, D)."""
        return self.embed_positions[pos]

    def check_length(self, n: int, what: str):
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{what} of {n} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}; truncate it")

    def embed(self, ids: torch.Tensor, pos: torch.Tensor, decoder: bool = False) -> torch.Tensor:
        tokens = self.shared(ids) * self.embed_scale  # (B, T, D)
        if decoder and self.config.zero_first_decoder_input:  # the TF code: position 0 has no token, only its sinusoid
            tokens = tokens.masked_fill((pos == 0)[None, :, None], 0.0)  # (B, T, D)
        x = tokens + self.positions(pos).to(self.dtype)  # (B, T, D)
        return F.dropout(x, self.config.dropout, self.training)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, S) -> encoder states (B, S, D). Padding keys are masked out."""
        self.check_length(input_ids.size(1), "input")
        x = self.embed(input_ids, torch.arange(input_ids.size(1), device=input_ids.device))
        mask = None if attention_mask is None else padding_mask(attention_mask)  # (B, 1, 1, S)
        for layer in self.encoder.layers:
            x = self.run_layer(layer, x, mask)
        return self.encoder.layer_norm(x)

    def run_layer(self, layer: nn.Module, *args) -> torch.Tensor:
        """layer(*args). With `grad_checkpoint` set, while training, the layer's activations are not kept
        for backward but recomputed there (Chen et al. 2016, https://arxiv.org/abs/1604.06174): memory
        for one layer instead of all, for about a third more compute. The recomputation replays the
        same dropout masks (checkpoint saves and restores the RNG state), so gradients are unchanged."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final decoder states (..., D) -> next-token scores (..., V): the one place they are computed."""
        # Tied output projection: the same matrix maps ids to vectors and vectors to scores.
        scores = self.shared.project(h)  # (..., V)
        if self.final_logits_bias is None:  # PEGASUS-X
            return scores
        # In place: the same sums, without a second (N, V) tensor (12 MB a step for beam 8 over 4 documents).
        # The bias is stored (1, V) as in the checkpoints; (V,) broadcasts.
        return scores.add_(self.final_logits_bias[0].to(h.dtype))

    def decode(self, decoder_input_ids, encoder_out=None, attention_mask=None, *, cache: DecoderCache | None = None,
               input_pos: torch.Tensor | None = None, decoder_attention_mask=None) -> torch.Tensor:
        """Decoder ids (B, T) -> final decoder states (B, T, D); `logits` scores them (decoding
        scores only the newest position, training all of them).

        Without a cache the whole prefix is processed with a causal mask (training, scoring).
        With a cache, `decoder_input_ids` are the new tokens at positions `input_pos` (T,) and
        cross-attention keys/values come from the cache. With neither `encoder_out` nor a cache
        the decoder runs alone as a language model (the reference's PegasusForCausalLM)."""
        B, T = decoder_input_ids.shape
        dev = decoder_input_ids.device
        if cache is None:
            self.check_length(T, "decoder input")
            input_pos = torch.arange(T, device=dev)
            mask = causal_mask(T, dev)  # (T, T)
            if decoder_attention_mask is not None:
                mask = mask & padding_mask(decoder_attention_mask)  # (B, 1, T, T)
                # As the reference, an additive mask of the most negative float: a query with no visible
                # key (a padded first position) then attends uniformly instead of giving 0 or NaN.
                big = torch.finfo(self.dtype).min
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=dev).masked_fill(~mask, big)
            cross_kv = None
            if encoder_out is not None:
                cross_kv = [layer.encoder_attn.project_kv(encoder_out) for layer in self.decoder.layers]
            cross_mask = None if attention_mask is None else padding_mask(attention_mask)  # (B, 1, 1, S)
        else:
            mask = cache.advance(input_pos)  # (T, slots read), or None
            cross_kv, cross_mask = cache.cross_kv, cache.cross_mask
            decoder_input_ids = cache.to_rows(decoder_input_ids)  # beam search moves hypotheses between rows
        x = self.embed(decoder_input_ids, input_pos, decoder=True)  # (B, T, D)
        for i, layer in enumerate(self.decoder.layers):
            x = self.run_layer(layer, x, mask, None if cross_kv is None else cross_kv[i], cross_mask,
                               None if cache is None else cache.self_kv[i], input_pos)
        x = self.decoder.layer_norm(x)  # (B, T, D)
        return x if cache is None else cache.to_hypotheses(x)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
        """Full teacher-forced pass: logits (B, T, V). Without decoder ids, scores the first
        summary token (the decoder sees only the start token)."""
        if decoder_input_ids is None:
            decoder_input_ids = input_ids.new_full((input_ids.size(0), 1), self.config.decoder_start_token_id)
        enc = self.encode(input_ids, attention_mask)
        return self.logits(self.decode(decoder_input_ids, enc, attention_mask,
                                       decoder_attention_mask=decoder_attention_mask))

    def new_cache(self, encoder_out, attention_mask, n_hyps: int, max_len: int) -> DecoderCache:
        self.check_length(max_len, "decoder cache")
        return DecoderCache(self, encoder_out, attention_mask, n_hyps, max_len)

    def loss(self, input_ids, attention_mask, labels, label_smoothing: float = 0.0):
        """Fine-tuning loss: cross-entropy of `labels` (B, T) (-100 = ignore) under teacher forcing."""
        logits = self(input_ids, attention_mask, shift_right(labels, self.config))
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)


def shift_right(labels: torch.Tensor, cfg: PegasusConfig) -> torch.Tensor:
    """Teacher forcing inputs: [start, y_0, ..., y_{T-2}], with ignored (-100) labels as <pad>."""
    start = labels.new_full((labels.size(0), 1), cfg.decoder_start_token_id)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == -100, cfg.pad_token_id)
