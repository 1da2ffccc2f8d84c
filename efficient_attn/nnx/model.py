"""NNX versions of the small Transformers of :mod:`efficient_attn.nn.model`, with packing.

Same :class:`~efficient_attn.nn.ModelConfig`, same parameter names (the linen
``block_<i>`` are ``blocks[i]`` here). ``segment_ids [B, T]`` pack several
documents into one row, each a contiguous run of one id (padding can be a
document of its own): every attention layer masks across documents
(``mask_mod`` methods only), learned positions restart at each document, and
the token shift does not carry a token across a document boundary. With no
segment ids the models equal their linen twins given the same parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.nn.model import ModelConfig, attention_kwargs, check_classifier, pool
from efficient_attn.nnx.attention import MultiHeadAttention

_positions_init = nnx.initializers.normal(0.02)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T]: True where a document begins (position 0 and wherever the id changes)."""
    first = jnp.ones_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int [B, T]: each token's position within its document (restarting at 0)."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)
    return t - start


def add_positions(x: jax.Array, table: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """x: [B, T, D] plus learned positions ``table [max_len, D]`` (per document with ids)."""
    if x.shape[1] > table.shape[0]:
        raise ValueError(f"sequence length {x.shape[1]} exceeds max_len={table.shape[0]}")
    if segment_ids is None:
        return x + table[None, : x.shape[1]]
    if segment_ids.shape != x.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"segment_ids must be int [batch, seq] = {x.shape[:2]}; "
            f"got {segment_ids.shape} {segment_ids.dtype}"
        )
    return x + table[segment_positions(segment_ids)]


class TokenShift(nnx.Module):
    """x_t + W x_{t-1}: a learned previous-token shift (Zoology's short convolution)."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.shift = nnx.Linear(features, features, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D]; segment_ids: int [B, T] (no shift across documents) -> [B, T, D]."""
        prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        if segment_ids is not None:
            prev = jnp.where(segment_starts(segment_ids)[..., None], 0, prev)
        return x + self.shift(prev)


def attention_layer(c: ModelConfig, *, causal: bool, rngs: nnx.Rngs) -> MultiHeadAttention:
    """The config's attention (method, options, scale, heads) over width ``c.d_model``."""
    return MultiHeadAttention(c.d_model, **attention_kwargs(c), causal=causal, rngs=rngs)


class ResidualBlock(nnx.Module):
    """Base of the pre-norm blocks: ``x + MLP(LN(x))`` (ln_mlp, mlp_in, mlp_out)."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        d = c.d_model
        self.ln_mlp = nnx.LayerNorm(d, rngs=rngs)
        self.mlp_in = nnx.Linear(d, c.mlp_ratio * d, rngs=rngs)
        self.mlp_out = nnx.Linear(c.mlp_ratio * d, d, rngs=rngs)

    def residual_mlp(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> x + MLP(LN(x))."""
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))


class Block(ResidualBlock):
    """Pre-norm Transformer block: x + attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, config: ModelConfig, *, causal: bool = True, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.attention = attention_layer(config, causal=causal, rngs=rngs)
        self.ln_attention = nnx.LayerNorm(config.d_model, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        kv_lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, T, D]; kv_lengths: int [B]; segment_ids: int [B, T] -> [B, T, D]."""
        h = self.ln_attention(x)
        x = x + self.attention(h, kv_lengths=kv_lengths, segment_ids=segment_ids)
        return self.residual_mlp(x)


class DecoderLM(nnx.Module):
    """Token + learned position embeddings, pre-norm causal blocks, tied output logits."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.embed = nnx.Embed(c.vocab_size, c.d_model, rngs=rngs)
        self.positions = nnx.Param(_positions_init(rngs.params(), (c.max_len, c.d_model)))
        self.token_shift = TokenShift(c.d_model, rngs=rngs) if c.token_shift else None
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
        self.ln_final = nnx.LayerNorm(c.d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens: int [B, T]; segment_ids: int [B, T] (packed documents) -> logits [B, T, V]."""
        x = add_positions(self.embed(tokens), self.positions[...], segment_ids)
        if self.token_shift is not None:
            x = self.token_shift(x, segment_ids)
        for block in self.blocks:
            x = block(x, segment_ids=segment_ids)
        return self.embed.attend(self.ln_final(x))


class Classifier(nnx.Module):
    """Bidirectional encoder + pooled classification head, as LRA's (Tay et al. 2020).

    See :class:`efficient_attn.nn.Classifier`. ``segment_ids`` restrict each
    token's attention to its own segment; pooling stays over all non-padding
    tokens (``"mean"`` only: a class token would see a single segment).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, d = check_classifier(config), config.d_model
        self.pooling = c.pooling
        self.embed = nnx.Embed(c.vocab_size, d, rngs=rngs)
        self.positions = nnx.Param(_positions_init(rngs.params(), (c.max_len, d)))
        if c.pooling == "cls":
            self.cls = nnx.Param(_positions_init(rngs.params(), (1, 1, d)))
        self.blocks = nnx.List([Block(c, causal=False, rngs=rngs) for _ in range(c.num_layers)])
        self.ln_final = nnx.LayerNorm(d, rngs=rngs)
        self.head_hidden = nnx.Linear(d, d, rngs=rngs)
        self.head = nnx.Linear(d, c.num_classes, rngs=rngs)

    def __call__(
        self, tokens: jax.Array, lengths: jax.Array, *, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """tokens: int [B, T]; lengths: int [B] (non-padding tokens) -> logits [B, classes]."""
        if segment_ids is not None and self.pooling == "cls":
            raise ValueError("segment_ids need pooling='mean' (a class token sees one segment)")
        x = add_positions(self.embed(tokens), self.positions[...], segment_ids)  # [B, T, D]
        lengths = lengths.astype(jnp.int32)
        if self.pooling == "cls":
            cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[2]))
            x, lengths = jnp.concatenate([cls, x], axis=1), lengths + 1
        for block in self.blocks:
            x = block(x, lengths, segment_ids)
        h = nnx.gelu(self.head_hidden(pool(self.ln_final(x), lengths, self.pooling)))
        return self.head(h)  # [B, classes]
