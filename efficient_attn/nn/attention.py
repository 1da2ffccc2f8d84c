"""A drop-in multi-head attention layer whose core is any registered method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import efficient_attn as ea


class MultiHeadAttention(nn.Module):
    """Multi-head attention (MHA/GQA/MQA) with ``method=`` any name in ``ea.methods()``.

    Attributes:
      num_heads: query heads N.
      head_dim: H.
      num_kv_heads: K key/value heads (None: K = N; 1: multi-query, Shazeer
        2019; 1 < K < N: grouped-query, Ainslie et al. 2023).
      method: attention method name.
      options: the method's options (``efficient-attn methods`` lists them).
      causal: bottom-right causal masking.
      out_features: output width (default: the input width).
      scale: logit scale (default: the method's, ``1/sqrt(head_dim)`` for most).
      sizes: sizes of the method's array options (e.g. ``{"A": 32}`` for
        ``additive``); those arrays are learned as parameters of this layer,
        initialised by the method's :class:`efficient_attn.ArrayOption`.
        Per-token arrays (``log_decay``, ``beta`` of the gated recurrences) are
        computed from the keys' input by small learned projections, as
        flash-linear-attention's layers do (:class:`efficient_attn.TokenProjection`).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    method: str = "dense"
    options: Mapping[str, Any] | None = None
    causal: bool = False
    out_features: int | None = None
    scale: float | None = None
    sizes: Mapping[str, int] | None = None
    dtype: Any = jnp.float32

    def _method_options(self, context: jax.Array) -> dict[str, Any]:
        """The method's options plus its array options: parameters, and per-token
        arrays computed from ``context [B, Tk, D]`` by their :class:`ea.TokenProjection`."""
        spec = ea.get_method(self.method)
        kv_heads = self.num_kv_heads or self.num_heads
        sizes = {**dict(self.sizes or {}), "K": kv_heads}
        shapes = spec.array_shapes(self.head_dim, per_token=False, **sizes)
        arrays = {  # optional arrays (retnet's fixed decays) keep the method's defaults
            name: self.param(name, spec.arrays[name].init, shape, jnp.float32).astype(self.dtype)
            for name, shape in shapes.items()
            if spec.arrays[name].required
        }
        dims = {**spec.sizes, **sizes, "H": self.head_dim}
        for name, array in spec.arrays.items():
            if array.per_token:
                tail = tuple(dims[d] for d in array.shape[2:])
                z = context
                if array.project.rank is not None:
                    down = nn.Dense(array.project.rank, use_bias=False, name=f"{name}_down")
                    z = down(z.astype(jnp.float32))
                z = nn.DenseGeneral(tail, name=f"{name}_proj")(z.astype(jnp.float32))
                arrays[name] = array.project.activation(z)  # float32 [B, Tk, *tail]
        return {**dict(self.options or {}), **arrays}

    def _project(self, x: jax.Array, context: jax.Array):
        kv_heads = self.num_kv_heads or self.num_heads
        dense = lambda heads, name: nn.DenseGeneral(  # noqa: E731
            (heads, self.head_dim), dtype=self.dtype, name=name
        )
        q = dense(self.num_heads, "query")(x)  # [B, Tq, N, H]
        k = dense(kv_heads, "key")(context)  # [B, Tk, K, H]
        v = dense(kv_heads, "value")(context)  # [B, Tk, K, H]
        return q, k, v

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        kv_lengths: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, Tq, D]; context: [B, Tk, D'] (default: x, self-attention) -> [B, Tq, D_out]."""
        context = x if context is None else context
        q, k, v = self._project(x, context)
        out = ea.attention(
            q,
            k,
            v,
            method=self.method,
            causal=self.causal,
            kv_lengths=kv_lengths,
            scale=self.scale,
            **self._method_options(context),
        )
        features = self.out_features or x.shape[-1]
        return nn.DenseGeneral(features, axis=(-2, -1), dtype=self.dtype, name="out")(out)

    @nn.compact
    def weights(
        self, x: jax.Array, context: jax.Array | None = None, *, kv_lengths: jax.Array | None = None
    ) -> jax.Array:
        """The ``[B, N, Tq, Tk]`` attention weights this layer applies (for plots)."""
        context = x if context is None else context
        q, k, _ = self._project(x, context)
        return ea.attention_weights(
            q,
            k,
            method=self.method,
            causal=self.causal,
            kv_lengths=kv_lengths,
            scale=self.scale,
            **self._method_options(context),
        )
