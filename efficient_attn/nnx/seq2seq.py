"""NNX version of the encoder-decoder of :mod:`efficient_attn.nn.seq2seq`, and greedy decoding."""

from __future__ import annotations

import jax
from flax import nnx

from efficient_attn.nn import seq2seq
from efficient_attn.nn.model import ModelConfig
from efficient_attn.nnx.model import ResidualBlock, TokenShift, attention_layer


class EncoderBlock(ResidualBlock):
    """Pre-norm block: x + self_attn(LN(x)) over all positions (not causal); x + MLP(LN(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.self_attention = attention_layer(config, causal=False, rngs=rngs)
        self.ln_self = nnx.LayerNorm(config.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, S, D]
        return self.residual_mlp(x + self.self_attention(self.ln_self(x)))


class DecoderBlock(ResidualBlock):
    """Pre-norm block: causal self-attention, cross-attention to ``memory``, MLP."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.self_attention = attention_layer(config, causal=True, rngs=rngs)
        self.ln_self = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.cross_attention = attention_layer(config, causal=False, rngs=rngs)
        self.ln_cross = nnx.LayerNorm(config.d_model, rngs=rngs)

    def __call__(self, x: jax.Array, memory: jax.Array) -> jax.Array:
        """x: [B, T, D] decoder states; memory: [B, S, D] encoder output -> [B, T, D]."""
        x = x + self.self_attention(self.ln_self(x))
        x = x + self.cross_attention(self.ln_cross(x), memory)
        return self.residual_mlp(x)


class EncoderDecoder(nnx.Module):
    """Encoder and decoder stacks of ``config.num_layers`` blocks each; tied embeddings.

    See :class:`efficient_attn.nn.EncoderDecoder` (same parameters; linen's
    ``encoder_<i>``/``decoder_<i>`` are ``encoder[i]``/``decoder[i]`` here).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, d = config, config.d_model
        self.embed = nnx.Embed(c.vocab_size, d, rngs=rngs)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.source_positions = nnx.Param(init(rngs.params(), (c.max_len, d)))
        self.target_positions = nnx.Param(init(rngs.params(), (c.max_len, d)))
        self.token_shift = TokenShift(d, rngs=rngs) if c.token_shift else None
        self.encoder = nnx.List([EncoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.decoder = nnx.List([DecoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.ln_encoder = nnx.LayerNorm(d, rngs=rngs)
        self.ln_final = nnx.LayerNorm(d, rngs=rngs)

    def encode(self, sources: jax.Array) -> jax.Array:
        """sources: int [B, S] -> memory [B, S, D] (layer-normalised encoder output)."""
        return seq2seq.encode(self, sources)

    def decode(self, memory: jax.Array, inputs: jax.Array) -> jax.Array:
        """memory: [B, S, D]; inputs: int [B, T] decoder tokens -> logits [B, T, vocab]."""
        return seq2seq.decode(self, memory, inputs)

    def __call__(self, sources: jax.Array, inputs: jax.Array) -> jax.Array:
        """sources: int [B, S]; inputs: int [B, T] (BOS + shifted targets) -> [B, T, vocab]."""
        return self.decode(self.encode(sources), inputs)


def greedy_decode(model: EncoderDecoder, sources: jax.Array, length: int, bos: int) -> jax.Array:
    """Greedy outputs ``int [B, length]`` for ``sources [B, S]`` (see ``nn.greedy_decode``).

    Jit ``nnx.jit(greedy_decode, static_argnames=("length", "bos"))``.
    """
    return seq2seq.greedy_loop(model.decode, model.encode(sources), length, bos)
