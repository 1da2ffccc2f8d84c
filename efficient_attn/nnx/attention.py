"""The NNX multi-head attention layer whose core is any registered method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import efficient_attn as ea
from efficient_attn.core.registry import positive_int
from efficient_attn.nn.attention import layer_arrays, segment_mask


class MultiHeadAttention(nnx.Module):
    """Multi-head attention (MHA/GQA/MQA) with ``method=`` any name in ``ea.methods()``.

    The NNX twin of :class:`efficient_attn.nn.MultiHeadAttention`: the same
    parameters under the same names (``query``, ``key``, ``value``, ``out``,
    the method's learned arrays and ``<array>_down``/``<array>_proj`` for
    per-token arrays), so :func:`efficient_attn.nnx.load_linen` copies one into the other.

    Args:
      in_features: D, width of ``x``.
      num_heads: query heads N.
      head_dim: H.
      num_kv_heads: K key/value heads (None: K = N; 1: multi-query; 1 < K < N: grouped-query).
      context_features: width of ``context`` for cross-attention (default: D).
      method: attention method name.
      options: the method's options (``efficient-attn methods`` lists them); array
        values (e.g. ``retnet``'s ``gamma``) are kept as fixed, untrained state.
      causal: bottom-right causal masking.
      out_features: output width (default: D).
      scale: logit scale (default: the method's).
      sizes: sizes of the method's array options (e.g. ``{"A": 32}`` for
        ``additive``); required arrays are parameters initialised by the method's
        :class:`efficient_attn.ArrayOption`; per-token arrays are computed from the
        keys' input by learned :class:`efficient_attn.TokenProjection` projections.
      dtype: computation dtype of the projections (parameters stay float32).
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_dim: int,
        *,
        num_kv_heads: int | None = None,
        context_features: int | None = None,
        method: str = "dense",
        options: Mapping[str, Any] | None = None,
        causal: bool = False,
        out_features: int | None = None,
        scale: float | None = None,
        sizes: Mapping[str, int] | None = None,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        positive_int("in_features", in_features)
        positive_int("num_heads", num_heads)
        positive_int("head_dim", head_dim)
        kv_heads = positive_int("num_kv_heads", num_kv_heads or num_heads)
        if num_heads % kv_heads:
            raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
        self.method, self.causal, self.scale, self.dtype = method, causal, scale, dtype
        options = dict(options or {})
        ea.get_method(method).resolve_options(options)  # unknown names fail here
        is_array = lambda v: isinstance(v, jax.Array | np.ndarray)  # noqa: E731
        self.options = {k: v for k, v in options.items() if not is_array(v)}
        self.fixed = nnx.data({k: jnp.asarray(v) for k, v in options.items() if is_array(v)})
        kv_in = context_features or in_features
        heads = {
            "query": (in_features, num_heads),
            "key": (kv_in, kv_heads),
            "value": (kv_in, kv_heads),
        }
        for name, (features, n) in heads.items():  # query [B, Tq, N, H], key/value [B, Tk, K, H]
            self._add(name, nnx.LinearGeneral(features, (n, head_dim), dtype=dtype, rngs=rngs))
        out_features = out_features or in_features
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim), out_features, axis=(-2, -1), dtype=dtype, rngs=rngs
        )
        learned = layer_arrays(method, head_dim, kv_heads, sizes)
        self._params = tuple(learned.params)
        for name, (shape, init) in learned.params.items():
            self._add(name, nnx.Param(init(rngs.params(), shape, jnp.float32)))
        self._tokens = tuple((n, p.activation, p.rank) for n, (_, p) in learned.tokens.items())
        for name, (tail, project) in learned.tokens.items():
            width = kv_in
            if project.rank is not None:
                self._add(
                    f"{name}_down", nnx.Linear(width, project.rank, use_bias=False, rngs=rngs)
                )
                width = project.rank
            self._add(f"{name}_proj", nnx.LinearGeneral(width, tail, rngs=rngs))

    def _add(self, name: str, value: Any) -> None:
        if hasattr(self, name):
            raise ValueError(
                f"array option {name!r} of {self.method!r} clashes with a layer attribute"
            )
        setattr(self, name, value)

    def _method_options(self, context: jax.Array) -> dict[str, Any]:
        """Options plus learned arrays; per-token ones from ``context [B, Tk, D]`` (float32)."""
        arrays = {name: getattr(self, name)[...].astype(self.dtype) for name in self._params}
        for name, activation, rank in self._tokens:
            z = context.astype(jnp.float32)
            if rank is not None:
                z = getattr(self, f"{name}_down")(z)
            arrays[name] = activation(getattr(self, f"{name}_proj")(z))  # [B, Tk, *tail]
        return {**self.options, **self.fixed, **arrays}

    def _inputs(self, x, context, kv_lengths, segment_ids) -> tuple:
        mask_mod = segment_mask(self.method, segment_ids, x.shape[1], context)
        context = x if context is None else context
        q, k = self.query(x), self.key(context)
        kw = dict(
            method=self.method,
            causal=self.causal,
            kv_lengths=kv_lengths,
            scale=self.scale,
            mask_mod=mask_mod,
            **self._method_options(context),
        )
        return q, k, context, kw

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        kv_lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, Tq, D]; context: [B, Tk, D'] (default: x) -> [B, Tq, D_out].

        kv_lengths: int [B], keys at positions >= it are padding. segment_ids:
        int [B, T] of a self-attention over packed sequences: a token attends only
        to tokens of its own segment (ANDed with ``causal``); methods supporting
        ``mask_mod`` only.
        """
        q, k, context, kw = self._inputs(x, context, kv_lengths, segment_ids)
        return self.out(ea.attention(q, k, self.value(context), **kw))

    def weights(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        kv_lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The ``[B, N, Tq, Tk]`` attention weights this layer applies (for plots)."""
        q, k, _, kw = self._inputs(x, context, kv_lengths, segment_ids)
        return ea.attention_weights(q, k, **kw)
