"""Shared mechanics written once: masks, GQA grouping, padding to tiles, softmax.

Conventions (see ``efficient_attn.api``):
  * causal is bottom-right aligned: query ``i`` sees key ``j`` iff
    ``j <= i + (Tk - Tq)``;
  * ``kv_lengths[b]``: keys at positions ``>= kv_lengths[b]`` are padding;
  * query head ``n`` uses key/value head ``n // G`` with ``G = N // K``
    (the convention of ``jax.nn.dot_product_attention``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stat_dtype(dtype) -> jnp.dtype:
    """dtype of softmax statistics: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def full_kv_lengths(kv_lengths: jax.Array | None, batch: int, tk: int) -> jax.Array:
    """``kv_lengths`` as int32 ``[B]``; None means every key is valid."""
    if kv_lengths is None:
        return jnp.full((batch,), tk, jnp.int32)
    return jnp.asarray(kv_lengths, jnp.int32)


def visible(
    q_pos: jax.Array,
    k_pos: jax.Array,
    kv_len: jax.Array,
    *,
    causal: bool,
    offset: int,
) -> jax.Array:
    """Which (query, key) pairs interact; broadcasts its arguments.

    Args:
      q_pos: query positions, e.g. ``[..., Tq, 1]``.
      k_pos: key positions, e.g. ``[..., 1, Tk]``.
      kv_len: valid key count, broadcastable against ``k_pos``.
      causal: apply the bottom-right causal rule.
      offset: ``Tk - Tq`` of the full (unpadded) problem.
    """
    mask = k_pos < kv_len
    if causal:
        mask = mask & (k_pos <= q_pos + offset)
    return mask


def dense_mask(
    kv_lengths: jax.Array | None, batch: int, tq: int, tk: int, *, causal: bool
) -> jax.Array:
    """Boolean ``[B, Tq, Tk]`` mask of visible pairs."""
    kv_len = full_kv_lengths(kv_lengths, batch, tk)
    return visible(
        jnp.arange(tq)[None, :, None],
        jnp.arange(tk)[None, None, :],
        kv_len[:, None, None],
        causal=causal,
        offset=tk - tq,
    )


def nonempty_rows(
    kv_lengths: jax.Array | None, batch: int, tq: int, tk: int, *, causal: bool
) -> jax.Array:
    """Boolean ``[B, Tq]``: which query rows see at least one key (O(B*Tq) work)."""
    kv_len = full_kv_lengths(kv_lengths, batch, tk)
    rows = jnp.broadcast_to(kv_len[:, None] > 0, (batch, tq))
    if causal:
        last_key = jnp.arange(tq) + (tk - tq)  # last visible key of each row
        rows = rows & (last_key >= 0)[None, :]
    return rows


def safe_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give 0.

    Stable for large logits (the row max is subtracted) and NaN-free for empty
    rows and their gradients.
    """
    s = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom == 0, 1.0, denom)


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[B, T, N, H] -> [B, T, K, G, H]``: query heads grouped by their K/V head."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h)


def ungroup_heads(x: jax.Array) -> jax.Array:
    """``[B, T, K, G, H] -> [B, T, N, H]`` (inverse of :func:`group_queries`)."""
    b, t, k, g, h = x.shape
    return x.reshape(b, t, k * g, h)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad ``axis`` of ``x`` up to a multiple of ``multiple``."""
    size = x.shape[axis]
    extra = cdiv(size, multiple) * multiple - size
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)
