"""A drop-in multi-head attention layer whose core is any registered method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import efficient_attn as ea
from efficient_attn.core.registry import methods_supporting


@dataclasses.dataclass(frozen=True)
class LayerArrays:
    """The arrays a layer learns for a method's array options (linen and nnx layers alike).

    Attributes:
      params: name -> ``(shape, init)`` of each required array that is a parameter
        (optional ones, e.g. ``retnet``'s fixed decays, keep the method's defaults).
      tokens: name -> ``(tail, projection)`` of each per-token array ``[B, Tk, *tail]``,
        computed from the keys' input ``[B, Tk, D]`` by ``projection``
        (:class:`efficient_attn.TokenProjection`: ``activation(x @ W1 @ W2 + b)``).
    """

    params: Mapping[str, tuple[tuple[int, ...], Callable[..., Any]]]
    tokens: Mapping[str, tuple[tuple[int, ...], ea.TokenProjection]]


def layer_arrays(
    method: str, head_dim: int, kv_heads: int, sizes: Mapping[str, int] | None = None
) -> LayerArrays:
    """What a layer with ``kv_heads`` K/V heads of ``head_dim`` learns for ``method``'s arrays."""
    spec = ea.get_method(method)
    sizes = {**dict(sizes or {}), "K": kv_heads}
    shapes = spec.array_shapes(head_dim, per_token=False, **sizes)
    params = {
        n: (shape, spec.arrays[n].init) for n, shape in shapes.items() if spec.arrays[n].required
    }
    dims = {**spec.sizes, **sizes, "H": head_dim}
    tokens = {
        n: (tuple(dims[d] for d in a.shape[2:]), a.project)
        for n, a in spec.arrays.items()
        if a.per_token
    }
    return LayerArrays(params, tokens)


def segment_mask(
    method: str, segment_ids: jax.Array | None, seq_len: int, context: Any = None
) -> Any:
    """``ea.mods.document_mask(segment_ids)`` for ``method``, or None without segment ids.

    segment_ids: int [B, T] (``T == seq_len``), a query sees a key iff their ids
    agree (packed sequences); ``ValueError`` if ``method`` does not take ``mask_mod``
    or a ``context`` is given (segment ids mask self-attention).
    """
    if segment_ids is None:
        return None
    if context is not None:
        raise ValueError("segment_ids mask self-attention; pass context=None with them")
    if "mask_mod" not in ea.get_method(method).supports:
        raise ValueError(
            f"segment_ids need a method that takes mask_mod; {method!r} does not. "
            f"Methods that do: {', '.join(methods_supporting('mask_mod'))}"
        )
    if segment_ids.ndim != 2 or segment_ids.shape[1] != seq_len:
        raise ValueError(f"segment_ids must be int [batch, {seq_len}]; got {segment_ids.shape}")
    return ea.mods.document_mask(segment_ids)


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
        kv_heads = self.num_kv_heads or self.num_heads
        learned = layer_arrays(self.method, self.head_dim, kv_heads, self.sizes)
        arrays = {
            name: self.param(name, init, shape, jnp.float32).astype(self.dtype)
            for name, (shape, init) in learned.params.items()
        }
        for name, (tail, project) in learned.tokens.items():
            z = context.astype(jnp.float32)
            if project.rank is not None:
                z = nn.Dense(project.rank, use_bias=False, name=f"{name}_down")(z)
            z = nn.DenseGeneral(tail, name=f"{name}_proj")(z)
            arrays[name] = project.activation(z)  # float32 [B, Tk, *tail]
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
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, Tq, D]; context: [B, Tk, D'] (default: x, self-attention) -> [B, Tq, D_out].

        segment_ids: int [B, Tq] for packed sequences (self-attention): a token
        attends within its document only (methods that take ``mask_mod``).
        """
        mask_mod = segment_mask(self.method, segment_ids, x.shape[1], context)
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
            mask_mod=mask_mod,
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
