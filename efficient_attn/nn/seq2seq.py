"""A small encoder-decoder Transformer whose every attention is any registered method.

Three kinds of attention, all :class:`MultiHeadAttention` with ``method=``:
bidirectional encoder self-attention, causal decoder self-attention, and
decoder-to-encoder cross-attention (``context=`` the encoder output), the
attention of Bahdanau, Cho & Bengio (2014) in the Transformer layout of
Vaswani et al. (2017). :func:`greedy_decode` generates autoregressively.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficient_attn.nn.model import ModelConfig, TokenShift, attention_layer, residual_mlp


class EncoderBlock(nn.Module):
    """Pre-norm block: x + self_attn(LN(x)) over all positions (not causal); x + MLP(LN(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, S, D]
        attn = attention_layer(self.config, causal=False, name="self_attention")
        x = x + attn(nn.LayerNorm(name="ln_self")(x))
        return residual_mlp(self.config, x)


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to ``memory``, MLP."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, memory: jax.Array) -> jax.Array:
        """x: [B, T, D] decoder states; memory: [B, S, D] encoder output -> [B, T, D]."""
        c = self.config
        x = x + attention_layer(c, causal=True, name="self_attention")(
            nn.LayerNorm(name="ln_self")(x)
        )
        cross = attention_layer(c, causal=False, name="cross_attention")
        x = x + cross(nn.LayerNorm(name="ln_cross")(x), context=memory)
        return residual_mlp(c, x)


def encode(m: Any, sources: jax.Array) -> jax.Array:
    """The encoder pass of an encoder-decoder, linen or NNX (they share attribute names).

    sources: int [B, S] -> memory [B, S, D].
    """
    x = m.embed(sources) + m.source_positions[None, : sources.shape[1]]
    for block in m.encoder:
        x = block(x)
    return m.ln_encoder(x)


def decode(m: Any, memory: jax.Array, inputs: jax.Array) -> jax.Array:
    """The decoder pass of an encoder-decoder, linen or NNX.

    memory: [B, S, D]; inputs: int [B, T] -> logits [B, T, vocab].
    """
    x = m.embed(inputs) + m.target_positions[None, : inputs.shape[1]]
    if m.token_shift is not None:
        x = m.token_shift(x)
    for block in m.decoder:
        x = block(x, memory)
    return m.embed.attend(m.ln_final(x))


class EncoderDecoder(nn.Module):
    """Encoder and decoder stacks of ``config.num_layers`` blocks each; tied embeddings.

    Learned position tables for source and target (``config.max_len`` each),
    initialised like the token embedding (std ``1/sqrt(D)``, not GPT-2's 0.02):
    alignment is mostly positional, and with tiny position vectors reversal
    trains several times slower, additive attention most of all.
    ``config.token_shift`` adds :class:`TokenShift` to the decoder input only
    (it is causal; the encoder already sees both directions).
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.d_model)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.source_positions = self.param("source_positions", init, (c.max_len, c.d_model))
        self.target_positions = self.param("target_positions", init, (c.max_len, c.d_model))
        self.token_shift = TokenShift() if c.token_shift else None
        self.encoder = [EncoderBlock(c) for _ in range(c.num_layers)]
        self.decoder = [DecoderBlock(c) for _ in range(c.num_layers)]
        self.ln_encoder = nn.LayerNorm()
        self.ln_final = nn.LayerNorm()

    def encode(self, sources: jax.Array) -> jax.Array:
        """sources: int [B, S] -> memory [B, S, D] (layer-normalised encoder output)."""
        return encode(self, sources)

    def decode(self, memory: jax.Array, inputs: jax.Array) -> jax.Array:
        """memory: [B, S, D]; inputs: int [B, T] decoder tokens -> logits [B, T, vocab]."""
        return decode(self, memory, inputs)

    def __call__(self, sources: jax.Array, inputs: jax.Array) -> jax.Array:
        """sources: int [B, S]; inputs: int [B, T] (BOS + shifted targets) -> [B, T, vocab]."""
        return self.decode(self.encode(sources), inputs)


def greedy_decode(
    model: EncoderDecoder, params: Any, sources: jax.Array, length: int, bos: int
) -> jax.Array:
    """Greedy autoregressive outputs ``int [B, length]`` for ``sources [B, S]``.

    Encodes once, then a ``lax.fori_loop`` over output positions: step ``t``
    runs the decoder on ``[BOS, y_0 .. y_{t-1}, <unused>]`` and appends the
    argmax at position ``t``. Positions after ``t`` are never seen (the decoder
    is causal), so every step reruns the whole (short) decoder instead of
    keeping a per-method cache; that works for any attention method. Jit
    ``functools.partial(greedy_decode, model, length=T, bos=BOS)``.
    """
    memory = model.apply(params, sources, method=EncoderDecoder.encode)
    decode = lambda memory, tokens: model.apply(  # noqa: E731
        params, memory, tokens, method=EncoderDecoder.decode
    )
    return greedy_loop(decode, memory, length, bos)


def greedy_loop(
    decode: Callable[[jax.Array, jax.Array], jax.Array], memory: jax.Array, length: int, bos: int
) -> jax.Array:
    """The loop of :func:`greedy_decode` for any ``decode(memory [B, S, D], tokens [B, T])
    -> logits [B, T, V]`` (linen or NNX) -> ``int [B, length]``."""
    tokens = jnp.full((memory.shape[0], length + 1), bos, jnp.int32)  # [B, T + 1]: BOS, y_0 ..

    def step(t, tokens):
        logits = decode(memory, tokens[:, :length])
        next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False), -1)
        return jax.lax.dynamic_update_index_in_dim(tokens, next_token.astype(jnp.int32), t + 1, 1)

    return jax.lax.fori_loop(0, length, step, tokens)[:, 1:]
