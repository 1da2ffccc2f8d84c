"""Tiles of the engine: the ``[B, T, N, H]`` <-> tile layouts, the static config of
one call and the per-tile helper (positions, masking, bias window, dropout).

FlashAttention-2 (Dao 2023) tiling; the mask is evaluated per tile from the
``mask_mod`` (Dong et al. 2024, "FlexAttention").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import masking
from efficient_attn.core.engine.score import DotScore, Score

# Tiled layouts: queries [nq, B, K, G, bq, H]; keys/values [nk, B, K, bk, H];
# per-row statistics [nq, B, K, G, bq].


def _q_blocks(x: jax.Array, kv_heads: int, block: int, fill: float = 0.0) -> jax.Array:
    """[B, T, N, *D] -> [nb, B, K, G, block, *D], padded with ``fill``."""
    x = _q_rows(x, kv_heads, block, fill)
    b, t = x.shape[:2]
    x = x.reshape(b, t // block, block, *x.shape[2:])
    return jnp.moveaxis(x, (1, 2), (0, 4))


def _q_unblocks(x: jax.Array, length: int) -> jax.Array:
    """[nb, B, K, G, block, *D] -> [B, length, N, *D]."""
    x = jnp.moveaxis(x, (0, 4), (1, 2))
    b, nb, block, k, g = x.shape[:5]
    return x.reshape(b, nb * block, k * g, *x.shape[5:])[:, :length]


def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T, K, H] -> [nb, B, K, block, H] (zero-padded)."""
    x = masking.pad_axis(jnp.asarray(x), 1, block)
    b, t, k, h = x.shape
    return x.reshape(b, t // block, block, k, h).transpose(1, 0, 3, 2, 4)


def default_tiles(q_len: int, k_len: int, backward: bool = False) -> tuple[int, int]:
    """``(block_q, block_k)`` of the XLA engine's forward (or ``backward``) when the caller
    names no tiles (``blockwise``, the ring kernels).

    Measured on a 2-core CPU (``python scripts/bench_peers.py --tiles 1024,2048,4096``,
    experiments/results/cpu/peers/tiles.md; B=1, 4 heads, head_dim 64, causal): 512x256
    is the fastest forward at 1k and 4k and within a few percent of the fastest at 2k.
    256x512 trains fastest at 1k (forward+backward 0.81-0.88x of 512x256 in three runs)
    while its forward alone is slower, so the backward runs its own 256x512 tiles; at 2k
    and 4k the two tilings' forward+backward differ by under 10%, either way from run to
    run. XLA's CPU matmuls use both cores only from about 512x256x64 per head: smaller
    tiles lose.
    The lengths are accepted for tables that depend on them (tiles are clipped to the
    lengths where they are used).
    """
    del q_len, k_len
    return (256, 512) if backward else (512, 256)


def _q_rows(x: jax.Array, kv_heads: int, block: int, fill: float = 0.0) -> jax.Array:
    """[B, T, N, *D] -> [B, nb*block, K, G, *D] (padded with ``fill``; no copy otherwise),
    the layout :func:`_q_tile` slices one tile at a time."""
    x = jnp.asarray(x)
    b, t, n = x.shape[:3]
    pad = masking.cdiv(t, block) * block - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(b, t + pad, kv_heads, n // kv_heads, *x.shape[3:])


def _q_tile(x: jax.Array, i, block: int) -> jax.Array:
    """Tile ``i`` of :func:`_q_rows`' layout: ``[B, K, G, block, *D]`` (slice and transpose
    in one copy: no relayout of the whole input beforehand)."""
    x = jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)
    return jnp.moveaxis(x, 1, 3)


def _kv_rows(x: jax.Array, block: int) -> jax.Array:
    """[B, T, K, H] -> [B, nb*block, K, H], zero-padded (no copy otherwise)."""
    return masking.pad_axis(jnp.asarray(x), 1, block)


def _kv_tile(x: jax.Array, j, block: int) -> jax.Array:
    """Tile ``j`` of :func:`_kv_rows`' layout: ``[B, K, block, H]``."""
    return jnp.swapaxes(jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1), 1, 2)


@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
    """Everything static about one engine call (a nondiff argument of the custom_vjp)."""

    bq: int
    bk: int
    score: Score
    mask_fn: Any  # hoisted mask_mod(b, h, q, kv, *consts) or None: partial tiles check bounds only
    score_fn: Any  # hoisted score_mod(s, b, h, q, kv, *consts) or None
    q_limit: int  # positions >= q_limit / k_limit are padding
    k_limit: int
    bias_qk: tuple[bool, bool] = (False, False)  # the bias varies along (queries, keys)
    dropout_rate: float = 0.0
    dropout_broadcast: bool = False
    groups: tuple[int, int] = (1, 1)  # the block mask's (Bm, Hm) when each runs its own lists
    bwd: _Static | None = None  # the backward's own tiles and mods traced at them (None: these)


def prescaled(st: _Static, q: jax.Array, scale: jax.Array) -> tuple[jax.Array, bool]:
    """``(q * scale, True)`` for the dot score in the statistics dtype (float32, float64): the
    logits come out of the matmul scaled, saving a pass over every tile; ``(q, False)``
    otherwise (low-precision inputs keep the scale in float32, after the matmul)."""
    if isinstance(st.score, DotScore) and jnp.dtype(q.dtype) == masking.stat_dtype(q.dtype):
        return q * scale.astype(q.dtype), True
    return q, False


def _head_index(b: int, kh: int, g: int, offset=None):
    """Index arrays of a tile ``[B, K, G, bq, bk]``: b ``[B,1,1,1,1]``, h ``[1,K,G,1,1]``
    (plus ``offset = (b0, h0)``: a group's first example and query head)."""
    bi = np.arange(b, dtype=np.int32).reshape(b, 1, 1, 1, 1)  # NumPy: constants
    hi = np.arange(kh, dtype=np.int32)[:, None] * g + np.arange(g, dtype=np.int32)
    hi = hi.reshape(1, kh, g, 1, 1)
    return (bi, hi) if offset is None else (bi + offset[0], hi + offset[1])


class _Tile:
    """Positions, masks and mods of one (query tile, key tile) pair."""

    def __init__(self, st: _Static, idx, q_pos, k_pos, i, j, kv_len, mask_consts, score_consts):
        self.st = st
        qp = jax.lax.dynamic_slice_in_dim(q_pos, i * st.bq, st.bq)
        kp = jax.lax.dynamic_slice_in_dim(k_pos, j * st.bk, st.bk)
        self.b, self.h = idx
        self.i, self.j = i, j
        self.qi = jnp.minimum(qp, st.q_limit - 1).reshape(1, 1, 1, -1, 1)
        self.ki = jnp.minimum(kp, st.k_limit - 1).reshape(1, 1, 1, 1, -1)
        self.q_ok, self.k_ok = qp < st.q_limit, kp < st.k_limit
        self.kv_ok = None if kv_len is None else kp[None, :] < kv_len[:, None]  # [B, bk]
        self.mask_consts, self.score_consts = mask_consts, score_consts

    def mask(self, partial: bool):
        """Bool mask broadcastable to ``[B, K, G, bq, bk]``, or None when every pair is visible."""
        mask = None
        if partial:
            mask = self.q_ok[:, None] & self.k_ok[None, :]
            if self.st.mask_fn is not None:
                mask = mask & self.st.mask_fn(self.b, self.h, self.qi, self.ki, *self.mask_consts)
        if self.kv_ok is not None:
            kv = self.kv_ok[:, None, None, None, :]
            mask = kv if mask is None else mask & kv
        return mask

    def values(self, v_j):
        """``v_j [B, K, bk, D]`` (keys or values) with padding keys zeroed: NaN never leaks."""
        return v_j if self.kv_ok is None else jnp.where(self.kv_ok[:, None, :, None], v_j, 0)

    def modded(self, s, consts):
        return self.st.score_fn(s, self.b, self.h, self.qi, self.ki, *consts)

    def _bias_window(self, bias):
        st = self.st
        bq, bk = st.bias_qk
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, self.i * st.bq if bq else zero, self.j * st.bk if bk else zero)
        start = tuple(jnp.asarray(x, jnp.int32) for x in start)
        size = (*bias.shape[:2], st.bq if bq else 1, st.bk if bk else 1)
        return start, size

    def bias(self, bias):
        """This tile's window of the padded bias ``[B|1, N|1, Tq|1, Tk|1]`` (heads as K, G)."""
        start, size = self._bias_window(bias)
        t = jax.lax.dynamic_slice(bias, start, size)
        kh, g = self.h.shape[1:3]
        heads = (kh, g) if size[1] > 1 else (1, 1)
        return t.reshape(size[0], *heads, *size[2:])

    def add_bias_grad(self, dbias, ds):
        """``dbias`` plus this tile's ``ds [B, K, G, bq, bk]``, summed over broadcast dims."""
        start, size = self._bias_window(dbias)
        g = ds.reshape(ds.shape[0], -1, *ds.shape[3:])  # [B, N, bq, bk]
        g = jnp.sum(g, axis=tuple(a for a in range(4) if size[a] == 1 and g.shape[a] > 1),
                    keepdims=True)  # fmt: skip
        g = g.astype(dbias.dtype)
        if not all(self.st.bias_qk):  # the window is shared by several tiles: accumulate
            g = g + jax.lax.dynamic_slice(dbias, start, size)
        # else each (query tile, key tile) window is visited once: a plain write
        return jax.lax.dynamic_update_slice(dbias, g, start)

    def dropout(self, seed):
        """``drop(x)``: the counter-based dropout of this tile, its mask drawn once
        (the identity without dropout)."""
        st = self.st
        if not st.dropout_rate:
            return lambda x: x
        drop = masking.Dropout(st.dropout_rate, seed, st.dropout_broadcast)
        keep = drop.keep(self.b, self.h, self.qi, self.ki)
        return lambda x: drop.scale(x, keep)
