"""PEGASUS-X: PEGASUS with an encoder that reads 16,384 tokens in linear time and memory.

PEGASUS-X (Phang, Zhao and Liu 2022, "Investigating Efficiently Extending Transformers for Long
Input Summarization", https://arxiv.org/abs/2208.04347) keeps the PEGASUS decoder and replaces the
encoder's full self-attention, whose (T x T) score matrix has 268M entries per head at 16k tokens,
with *staggered block-local attention plus global tokens*:

  - the input is cut into blocks of `block_size` tokens and a token attends only within its block;
  - `num_global_tokens` learned vectors, tied to no input position, run alongside the tokens as a
    second sequence: every token also attends to all of them, and they attend to every token, so
    information crosses blocks in a single layer by way of the globals;
  - every other layer shifts the block boundaries by half a block ("staggering"), so two
    neighbours split by a boundary in one layer share a block in the next.

Per layer this costs O(T * (block_size + num_global_tokens)) instead of O(T^2). Everything else is
PEGASUS (pegasus.py) with three small changes: the attention projections have no bias, there is no
`final_logits_bias`, and the sinusoid frequencies are spaced slightly differently (`sinusoids_x`).
Parameter names follow the Hugging Face checkpoints, so load_weights.py maps them as for PEGASUS.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pegasus import Attention, EncoderLayer, Pegasus, PegasusConfig, Stack

# ----------------------------------------------------------------------------- config


@dataclass
class PegasusXConfig(PegasusConfig):
    max_position_embeddings: int = 16384  # longest input accepted (positions are computed, not stored)
    block_size: int = 512  # tokens per local-attention block; must be even when staggering
    num_global_tokens: int = 128  # learned global vectors that every block can read and that read every block
    stagger_local_blocks: bool = True  # odd-numbered encoder layers shift the blocks by block_size / 2
    model_type: str = "pegasus_x"


# The published checkpoints (config.json files; ../shared/configs/published.json). Both use relu,
# vocab 96,103, scaled embeddings, pad=start=0, eos=1, and decode with beam 8, length penalty 0.8.
#
#   checkpoint              d_model layers heads ffn   block globals stagger positions params
#   google/pegasus-x-base   768     12+12  12    3072  512   128     yes     16384     272M
#   google/pegasus-x-large  1024    16+16  16    4096  512   128     yes     16384     568M
PUBLISHED = {
    "google/pegasus-x-base": PegasusXConfig(d_model=768, encoder_layers=12, decoder_layers=12,
                                            encoder_attention_heads=12, decoder_attention_heads=12,
                                            encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "google/pegasus-x-large": PegasusXConfig(),
}


# ----------------------------------------------------------------------------- positions


def sinusoids_x(pos: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """PEGASUS-X position vectors for the integer positions `pos`, (T,) -> (T, dim), in `dtype`.

    Same [sines | cosines] layout as PEGASUS, but the frequencies run from 1 to exactly 1/10000:
        PEGASUS-X  w_i = 10000^(-i / (half - 1))      i = 0 .. half-1,  half = dim // 2
        PEGASUS    w_i = 10000^(-i / half)
    Using the wrong one fails silently: the model just reads slightly wrong positions.
    As in the reference, the vectors are computed on the fly *in the model dtype*. In bfloat16 that
    rounds the frequencies and even the positions (8 significant bits: position 1,001 is read as
    1,000, position 16,383 as 16,384); we do the same so that bfloat16 gives the reference's numbers.
    """
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=pos.device).to(dtype) * -(math.log(10000.0) / (half - 1)))  # (half,)
    angles = pos[:, None] * freq[None, :]  # (T, half); integer positions are cast to `dtype` here
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (T, dim)


# ----------------------------------------------------------------------------- global-local attention


class GlobalLocalAttention(Attention):
    """Encoder self-attention of PEGASUS-X, over G global tokens followed by S input tokens.

        keys ->     globals | block 0 | block 1 | block 2
        globals     ########|#########|#########|#########   global tokens see everything
        block 0     ########|#########|         |
        block 1     ########|         |#########|            a token sees all global tokens and its
        block 2     ########|         |         |#########   own block, under a single softmax

    Both parts are ordinary attention calls (pegasus.Attention.attend: SDPA or plain math): the
    global rows are one call over all G + S keys; the token rows become B*N independent "sequences"
    of block_size queries whose keys are the G global keys followed by the block's own keys. Nothing
    of size (S x S) is built: the largest score tensor is (B*N, H, block, G + block).

    Blocks need a whole number of tokens. The reference pads the hidden states (to a multiple of the
    block size in the encoder, and by half a block on each side in staggered layers) and runs the
    padding through every projection and FFN. Here only the local part's projected queries, keys
    and values are padded, with masked zeros: the padding costs no matmul, and as padded keys are
    masked in both, real tokens get the same outputs.
    """

    def forward(self, h, mask, n_global: int, block_size: int, shift: int = 0):
        """h: (B, G+S, D), the G global tokens then the S input tokens; mask: (B, G+S) bool, True =
        real (globals always). Blocks start at token -shift (staggering). Returns (B, G+S, D)."""
        B, T, D = h.shape
        G, S, H, Dh, K = n_global, T - n_global, self.n_heads, self.head_dim, block_size
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)  # (B, G+S, D) each
        if self.compute_dtype is not None:  # int8 on AMX (Attention.compute_dtype): cast once, before the blocks'
            q, k, v = (t.to(self.compute_dtype) for t in (q, k, v))  # copies, not in every attend call beside them

        # Global queries: one attention over everything.
        g_out, g_w = self.attend(self.split_heads(q[:, :G]), self.split_heads(k), self.split_heads(v),
                                 mask[:, None, None, :])  # (B, H, G, Dh)

        # Token queries, block by block: `shift` masked zeros in front of the tokens, and enough at
        # the end to fill the last block.
        pad = (shift, -(S + shift) % K)
        L = S + sum(pad)
        N = L // K  # number of blocks
        q, kx, vx = (F.pad(t[:, G:], (0, 0, *pad)) for t in (q, k, v))  # (B, L, D) each
        mask = F.pad(mask[:, G:], pad, value=False)  # (B, L)

        def blocks(t):  # (B, L, D) -> (B, N, H, K, Dh), a view
            return t.view(B, N, K, H, Dh).transpose(2, 3)

        def with_globals(t, tx):  # [globals | block] keys or values, (B*N, H, G+K, Dh). The global keys are
            # copied once per block so that each block is a plain attention call; G/K of the local keys' size.
            tg = self.split_heads(t[:, :G])[:, None].expand(B, N, H, G, Dh)  # (B, N, H, G, Dh)
            return torch.cat([tg, blocks(tx)], dim=3).view(B * N, H, G + K, Dh)

        l_mask = torch.cat([mask.new_ones(B, N, G), mask.view(B, N, K)], dim=2)  # (B, N, G+K)
        l_out, l_w = self.attend(blocks(q).reshape(B * N, H, K, Dh), with_globals(k, kx), with_globals(v, vx),
                                 l_mask.view(B * N, 1, 1, G + K))  # (B*N, H, K, Dh)
        if self.keep_weights:
            self.weights = {"local": l_w.view(B, N, H, K, G + K), "global": g_w}  # (B, N, H, K, G+K), (B, H, G, G+S)
        x_out = l_out.view(B, N, H, K, Dh).transpose(2, 3).reshape(B, L, D)[:, shift: shift + S]  # (B, S, D)
        g_out = g_out.transpose(1, 2).reshape(B, G, D)  # (B, G, D)
        return self.out_proj(torch.cat([g_out, x_out], dim=1).to(h.dtype))  # (B, G+S, D)


# ----------------------------------------------------------------------------- encoder


class EncoderLayerX(EncoderLayer):
    """A PEGASUS encoder block over one sequence: G global tokens followed by the S input tokens.

    The globals are G extra rows that differ from tokens in two places only: their attention
    pattern (above) and their own pre-attention LayerNorm (`global_self_attn_layer_norm`; tokens use
    `self_attn_layer_norm`). The projections, the FFN and its LayerNorm are shared, so both run on
    all G + S rows at once.

    Staggering (odd layers when `stagger_local_blocks`): the blocks start half a block early, so
    every block boundary moves by block_size / 2. With block_size 4 and 10 tokens:

        tokens          0 1 2 3 4 5 6 7 8 9
        even layers    [0 1 2 3][4 5 6 7][8 9 - -]
        odd layers [- - 0 1][2 3 4 5][6 7 8 9]          - = masked padding
    """

    attention = GlobalLocalAttention

    def __init__(self, cfg: PegasusXConfig, stagger: bool):
        super().__init__(cfg, cfg.encoder_ffn_dim, cfg.encoder_attention_heads, bias=False)
        self.global_self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.n_global, self.block_size = cfg.num_global_tokens, cfg.block_size
        self.shift = cfg.block_size // 2 if stagger else 0

    def forward(self, x, mask):
        """x: (B, G+S, D), globals first; mask: (B, G+S) bool. Returns the new x."""
        G = self.n_global
        h = torch.cat([self.global_self_attn_layer_norm(x[:, :G]), self.self_attn_layer_norm(x[:, G:])], dim=1)
        x = self.residual(x, self.self_attn(h, mask, G, self.block_size, self.shift))
        return self.feed_forward(x)


class EncoderX(Stack):
    """The PEGASUS-X encoder's parameters: layers, final LayerNorm and the global-token embeddings."""

    def __init__(self, cfg: PegasusXConfig):
        super().__init__([EncoderLayerX(cfg, stagger=cfg.stagger_local_blocks and i % 2 == 1)
                          for i in range(cfg.encoder_layers)], cfg.d_model)
        self.embed_global = nn.Embedding(cfg.num_global_tokens, cfg.d_model)  # (G, D)


# ----------------------------------------------------------------------------- model


class PegasusX(Pegasus):
    """PEGASUS-X encoder-decoder with its LM head (the reference's PegasusXForConditionalGeneration).
    Same interface as pegasus.Pegasus: forward, encode, decode, new_cache, loss."""

    attention_bias = False  # no bias in any q/k/v/out projection (the FFN keeps its biases)
    logits_bias = False  # no final_logits_bias: logits are h @ shared^T
    # float16 is refused: the reference documents PEGASUS-X as not supporting it. Setting
    # `PegasusX.allow_fp16 = True` (or on one model) lets it run anyway, at your own risk.
    allow_fp16 = False

    def __init__(self, config: PegasusXConfig):
        if config.num_global_tokens < 1:
            raise ValueError(f"num_global_tokens must be >= 1 (got {config.num_global_tokens}): without global "
                             "tokens a fully padded block would have nothing to attend to")
        if config.block_size < 1 or (config.stagger_local_blocks and config.block_size % 2):
            raise ValueError(f"block_size must be a positive even number when stagger_local_blocks is set "
                             f"(got {config.block_size})")
        if config.d_model % 2:
            raise ValueError(f"d_model must be even for the [sines | cosines] positions (got {config.d_model})")
        super().__init__(config)  # shared embedding, our encoder (build_encoder), bias-free decoder, init

    def build_encoder(self, cfg: PegasusXConfig) -> "EncoderX":
        return EncoderX(cfg)  # global-local attention instead of full attention

    @classmethod
    def check_dtype(cls, dtype: torch.dtype, force: bool = False):
        """Raise for float16 unless forced (argument or `allow_fp16`); bfloat16 and float32 are fine."""
        if dtype == torch.float16 and not (force or cls.allow_fp16):
            raise ValueError("PEGASUS-X does not support float16 (the reference documents it as unsupported); "
                             "use bfloat16 or float32, or set PegasusX.allow_fp16 = True to run it anyway")

    def init_buffers(self):
        pass  # no position table: positions are computed on the fly, in the model dtype

    def positions(self, pos: torch.Tensor) -> torch.Tensor:
        return sinusoids_x(pos, self.config.d_model, self.dtype)  # (T, D)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, S) -> encoder states (B, S, D), in time and memory linear in S."""
        self.check_dtype(self.dtype, force=self.allow_fp16)
        B, S = input_ids.shape
        self.check_length(S, "input")
        x = self.embed(input_ids, torch.arange(S, device=input_ids.device))  # (B, S, D)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # The global tokens go in front of the input. They start from learned vectors (no scaling,
        # positions or dropout) and are never masked.
        G = self.config.num_global_tokens
        x = torch.cat([self.encoder.embed_global.weight.expand(B, -1, -1), x], dim=1)  # (B, G+S, D)
        mask = F.pad(mask, (G, 0), value=True)  # (B, G+S)
        for layer in self.encoder.layers:
            x = self.run_layer(layer, x, mask)
        return self.encoder.layer_norm(x[:, G:])  # (B, S, D); the final global states are not used
