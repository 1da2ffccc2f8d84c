"""Any registered method as the ``attention_fn`` of Flax's attention layers.

``flax.nnx.MultiHeadAttention(..., attention_fn=attention_fn("blockwise"))`` and
``flax.linen.MultiHeadDotProductAttention(..., attention_fn=...)`` then run our
method with Flax's own arguments: its (float or bool) masks, bias, dropout
(``broadcast_dropout`` included), ``deterministic``, ``dtype`` and ``is_causal``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from efficient_attn.core.registry import get_method
from efficient_attn.dropin import dot_product_attention


def attention_fn(method: str = "blockwise", **options: Any) -> Callable[..., jax.Array]:
    """A Flax ``attention_fn`` running ``method`` (``options``) via ``ea.dot_product_attention``.

    The returned function takes Flax's arguments: query ``[..., T, N, H]``,
    key/value ``[..., S, K, H]`` (any number of batch dims), ``bias``,
    ``mask`` broadcastable to ``[..., N, T, S]`` (nonzero or True: visible),
    ``dropout_rng``, ``dropout_rate``, ``broadcast_dropout`` (one mask for all
    batch rows and heads, Flax's default), ``deterministic``, ``dtype`` (the
    computation dtype), ``precision`` (only None: the method picks its own),
    ``module`` (only None: weights are not materialised; use
    :func:`efficient_attn.attention_weights`), ``is_causal``. Softmax
    statistics are always float32, so ``force_fp32_for_softmax`` is accepted
    either way. Unlike Flax, rows that see no key give zeros.
    """
    get_method(method)  # unknown names fail here, not inside a model

    def attention(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        force_fp32_for_softmax: bool = False,
        is_causal: bool = False,
    ) -> jax.Array:
        if precision is not None:
            raise ValueError(
                f"precision={precision!r}: efficient_attn methods choose their own matmul "
                "precision (float32 statistics); pass precision=None"
            )
        if module is not None:
            raise ValueError(
                "sow_weights / module: efficient_attn does not materialise the attention "
                "weights; use efficient_attn.attention_weights for them"
            )
        query, key, value = (jnp.asarray(x) for x in (query, key, value))
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        else:
            common = jnp.result_type(query, key, value)
            query, key, value = (x.astype(common) for x in (query, key, value))
        batch = query.shape[:-3]
        if key.shape[:-3] != batch or value.shape[:-3] != batch:
            raise ValueError(
                f"query {query.shape}, key {key.shape} and value {value.shape} must share "
                "their batch dims [..., T, N, H]"
            )
        flat = math.prod(batch) if batch else 1

        def fold(x):  # [..., a, b, c] -> [prod(...), a, b, c]; size-1 batch dims stay 1
            if x is None:
                return None
            x = jnp.asarray(x)
            lead = x.shape[: x.ndim - 3] if x.ndim > 3 else ()
            if len(lead) != len(batch):
                return x
            if all(d == 1 for d in lead):
                return x.reshape(1, *x.shape[-3:])
            return jnp.broadcast_to(x, (*batch, *x.shape[-3:])).reshape(flat, *x.shape[-3:])

        q, k, v = (x.reshape(flat, *x.shape[-3:]) for x in (query, key, value))
        m = None if mask is None else fold(jnp.asarray(mask) != 0)
        use_dropout = dropout_rate > 0.0 and not deterministic
        out = dot_product_attention(
            q, k, v, fold(bias), m, is_causal=bool(is_causal), method=method,
            dropout_rate=dropout_rate if use_dropout else 0.0,
            dropout_rng=dropout_rng if use_dropout else None,
            dropout_broadcast=bool(broadcast_dropout), **options,
        )  # fmt: skip
        return out.reshape(*batch, *out.shape[1:])

    attention.__name__ = f"attention_fn_{method}"
    return attention
