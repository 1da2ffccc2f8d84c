"""Small Transformers for synthetic tasks: a decoder-only LM (Zoology-sized) and an encoder
classifier (Long Range Arena's, Tay et al. 2020)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficient_attn.core.registry import get_method
from efficient_attn.nn.attention import MultiHeadAttention


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of :class:`DecoderLM`; defaults follow Zoology's small MQAR models."""

    vocab_size: int = 64
    max_len: int = 64
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int | None = None
    mlp_ratio: int = 4
    method: str = "dense"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    token_shift: bool = True
    scale: float | None = None  # attention logit scale (None: the method's default)
    num_classes: int | None = None  # Classifier: output classes
    pooling: str = "mean"  # Classifier: "mean" over non-padding tokens or "cls" (a class token)


class TokenShift(nn.Module):
    """x_t + W x_{t-1}: a learned previous-token shift (a width-2 causal convolution).

    Zoology (Arora et al. 2023) puts a short convolution before the sequence
    mixer; without it attention models sit on the MQAR plateau far longer.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        return x + nn.Dense(x.shape[-1], use_bias=False, name="shift")(prev)


def attention_kwargs(c: ModelConfig) -> dict[str, Any]:
    """The config's attention settings (heads, method, options, scale), for either layer."""
    return {
        "num_heads": c.num_heads,
        "head_dim": c.d_model // c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "method": c.method,
        "options": c.options,
        "scale": c.scale,
    }


def attention_layer(c: ModelConfig, *, causal: bool, name: str) -> MultiHeadAttention:
    """The config's attention (method, options, scale, heads) as a layer named ``name``."""
    return MultiHeadAttention(**attention_kwargs(c), causal=causal, name=name)


def residual_mlp(c: ModelConfig, x: jax.Array) -> jax.Array:
    """``x + MLP(LN(x))``; call inside a compact module (submodules ln_mlp, mlp_in, mlp_out)."""
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(c.mlp_ratio * c.d_model, name="mlp_in")(h)
    return x + nn.Dense(c.d_model, name="mlp_out")(nn.gelu(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)); x + MLP(LN(x))."""

    config: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D]; kv_lengths: int [B], keys at positions >= it are padding."""
        attn = attention_layer(self.config, causal=self.causal, name="attention")
        x = x + attn(nn.LayerNorm(name="ln_attention")(x), kv_lengths=kv_lengths)
        return residual_mlp(self.config, x)


class DecoderLM(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, tied output logits."""

    config: ModelConfig

    def _embed(self, tokens: jax.Array) -> tuple[jax.Array, nn.Embed]:
        c = self.config
        embed = nn.Embed(c.vocab_size, c.d_model, name="embed")
        positions = self.param("positions", nn.initializers.normal(0.02), (c.max_len, c.d_model))
        x = embed(tokens) + positions[None, : tokens.shape[1]]
        if c.token_shift:
            x = TokenShift(name="token_shift")(x)
        return x, embed

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [B, T] -> logits [B, T, vocab]."""
        x, embed = self._embed(tokens)
        for i in range(self.config.num_layers):
            x = Block(self.config, name=f"block_{i}")(x)
        return embed.attend(nn.LayerNorm(name="ln_final")(x))


POOLINGS: tuple[str, ...] = ("mean", "cls")


def check_classifier(c: ModelConfig) -> ModelConfig:
    """``c`` if it configures a :class:`Classifier` (a known pooling, num_classes >= 1)."""
    if c.pooling not in POOLINGS:
        raise ValueError(f"pooling={c.pooling!r}; valid: {', '.join(POOLINGS)}")
    if not c.num_classes:
        raise ValueError(f"Classifier needs num_classes >= 1, got {c.num_classes}")
    if c.pooling == "cls" and _causal_only(c):
        raise ValueError(
            f"method {c.method!r} is a causal recurrence: its Classifier blocks run causally, "
            "where a class vector at position 0 sees nothing; use pooling='mean'"
        )
    return c


def _causal_only(c: ModelConfig) -> bool:
    return get_method(c.method).causal_only


def pool(x: jax.Array, lengths: jax.Array, pooling: str) -> jax.Array:
    """x: [B, T, D] -> [B, D]: the first token (``"cls"``) or the mean of the first ``lengths``."""
    if pooling == "cls":
        return x[:, 0]
    valid = (jnp.arange(x.shape[1])[None, :] < lengths[:, None]).astype(x.dtype)  # [B, T]
    return (x * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1), 1.0)[:, None]


class Classifier(nn.Module):
    """Bidirectional encoder + pooled classification head, as LRA's (Tay et al. 2020).

    Token + learned position embeddings, non-causal pre-norm blocks whose
    attention ignores padding keys (``kv_lengths``, for every method), a final
    LayerNorm, then ``pooling``: ``"mean"`` over the non-padding tokens or
    ``"cls"`` (a learned class vector prepended to the sequence, LRA's
    ``pooling_mode = "CLS"``), then Dense-GELU-Dense to ``num_classes`` logits.
    A causal recurrence (a method registered ``causal_only``: RetNet, Mamba-2, GLA,
    DeltaNet, ...) has no bidirectional form: its blocks run causally, as a recurrent
    classifier reads a sequence, and ``"mean"`` pools their outputs.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """tokens: int [B, T]; lengths: int [B] (non-padding tokens) -> logits [B, classes]."""
        c = check_classifier(self.config)
        x = nn.Embed(c.vocab_size, c.d_model, name="embed")(tokens)  # [B, T, D]
        positions = self.param("positions", nn.initializers.normal(0.02), (c.max_len, c.d_model))
        x = x + positions[None, : tokens.shape[1]]
        lengths = lengths.astype(jnp.int32)
        if c.pooling == "cls":
            cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, c.d_model))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.d_model)), x], axis=1)
            lengths = lengths + 1
        for i in range(c.num_layers):
            x = Block(c, causal=_causal_only(c), name=f"block_{i}")(x, lengths)
        pooled = pool(nn.LayerNorm(name="ln_final")(x), lengths, c.pooling)
        h = nn.gelu(nn.Dense(c.d_model, name="head_hidden")(pooled))
        return nn.Dense(c.num_classes, name="head")(h)  # [B, classes]
