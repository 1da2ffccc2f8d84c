"""The chunked engine shared by the linear-attention families: split, scan, merge.

Causal linear and gated attention (Katharopoulos et al. 2020; Yang et al. 2024,
GLA; flash-linear-attention) split the sequence into chunks of ``C`` positions:
inside a chunk a ``C x C`` masked matmul, across chunks a recurrence over the
states at chunk boundaries (``jax.lax.scan``), so time is ``O(T C H + T H Hv)``
and the backward pass keeps ``O(T / C)`` states, never one per position.
Sequences of any length are zero-padded to whole chunks here; the callers make
padded positions leave the state unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from efficient_attn.core import masking


def to_chunks(x: jax.Array, axis: int, chunk: int) -> jax.Array:
    """``[..., T, ...] -> [..., nc, C, ...]``: ``axis`` zero-padded to ``nc * C`` and split."""
    axis = axis % x.ndim
    x = masking.pad_axis(x, axis, chunk)
    return x.reshape(*x.shape[:axis], x.shape[axis] // chunk, chunk, *x.shape[axis + 1 :])


def from_chunks(x: jax.Array, axis: int, length: int) -> jax.Array:
    """Inverse of :func:`to_chunks`: ``[..., nc, C, ...] -> [..., length, ...]`` at ``axis``."""
    axis = axis % x.ndim
    merged = x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(merged, 0, length, axis=axis)


def scan_chunks(
    body: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: tuple[jax.Array, ...],
    axes: int | tuple[int, ...],
    out_axis: int,
    *,
    checkpoint: bool = False,
) -> tuple[Any, Any]:
    """``jax.lax.scan`` over the chunks of ``xs`` (chunk axis ``axes``, one per array or shared).

    ``body(carry, x_n) -> (carry, y_n)``; returns ``(final carry, ys)`` with the
    chunk axis of every leaf of ``ys`` at ``out_axis``. ``checkpoint``
    rematerialises ``body`` in the backward pass, which then stores only the
    carries (one state per chunk). One chunk runs ``body`` once, without a scan.
    """
    axes = (axes,) * len(xs) if isinstance(axes, int) else axes
    xs = tuple(jnp.moveaxis(x, a, 0) for x, a in zip(xs, axes, strict=True))
    if xs[0].shape[0] == 1:
        final, ys = body(init, tuple(x[0] for x in xs))
        ys = jax.tree_util.tree_map(lambda y: y[None], ys)
    else:
        step = jax.checkpoint(body, prevent_cse=False) if checkpoint else body
        final, ys = jax.lax.scan(step, init, xs)
    return final, jax.tree_util.tree_map(lambda y: jnp.moveaxis(y, 0, out_axis), ys)
