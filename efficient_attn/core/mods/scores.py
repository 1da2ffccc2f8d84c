"""Score mods: ALiBi (Press et al. 2022), tanh soft-capping, a learned relative-position bias."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from efficient_attn.core.mods.base import Score, _int, _pytree


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes ``2^(-8 i / n)``, i = 1..n (Press et al. 2022), float32 ``[N]``.

    For a head count that is not a power of two, the paper's interleaving of
    the next power of two's slopes.
    """
    n = _int("num_heads", num_heads, 1)

    def pow2(m):
        return [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]

    closest = 2 ** int(np.floor(np.log2(n)))
    slopes = pow2(closest) + pow2(2 * closest)[0::2][: n - closest]
    return np.asarray(slopes, np.float32)


@_pytree("slopes")
@dataclasses.dataclass(frozen=True)
class ALiBi(Score):
    """``score - slopes[h] * |q_idx + offset - kv_idx|``."""

    slopes: Any
    offset: int = 0

    def __call__(self, score, b, h, q_idx, kv_idx):
        dist = jnp.abs(q_idx + self.offset - kv_idx).astype(score.dtype)
        return score - self.slopes[h].astype(score.dtype) * dist


def alibi(slopes: Any, *, offset: int = 0) -> ALiBi:
    """ALiBi (Press et al. 2022, "Train Short, Test Long"): a linear distance penalty per head.

    ``slopes [N]`` (:func:`alibi_slopes`, or learned: gradients reach them).
    """
    s = jnp.asarray(slopes)
    if s.ndim != 1 or not jnp.issubdtype(s.dtype, jnp.floating):
        raise ValueError(f"slopes must be a float array [heads]; got {s.shape} {s.dtype}")
    return ALiBi(s, int(offset))


@_pytree()
@dataclasses.dataclass(frozen=True)
class SoftCap(Score):
    """``cap * tanh(score / cap)``."""

    cap: float

    def __call__(self, score, b, h, q_idx, kv_idx):
        cap = jnp.asarray(self.cap, score.dtype)
        return cap * jnp.tanh(score / cap)


def soft_cap(cap: float) -> SoftCap:
    """Tanh soft-capping of logits (Gemma 2; Grok): ``cap * tanh(score / cap)``."""
    if not isinstance(cap, int | float) or isinstance(cap, bool) or cap <= 0:
        raise ValueError(f"cap={cap!r} must be a positive number")
    return SoftCap(float(cap))


@_pytree("table")
@dataclasses.dataclass(frozen=True)
class RelativeBias(Score):
    """``score + table[h, clip(kv_idx - q_idx, -d, d) + d]`` with ``d = max_distance``."""

    table: Any
    max_distance: int

    def __call__(self, score, b, h, q_idx, kv_idx):
        d = self.max_distance
        rel = jnp.clip(kv_idx - q_idx, -d, d) + d
        return score + self.table[h, rel].astype(score.dtype)


def relative_position_bias(table: Any) -> RelativeBias:
    """A learned relative-position bias (Shaw et al. 2018; T5-style, unbucketed).

    ``table [N, 2 d + 1]``: the bias of head ``h`` at relative distance
    ``kv_idx - q_idx`` clipped to ``[-d, d]``. Gradients reach the table.
    """
    t = jnp.asarray(table)
    if t.ndim != 2 or t.shape[1] % 2 != 1 or not jnp.issubdtype(t.dtype, jnp.floating):
        raise ValueError(
            f"table must be a float array [heads, 2 * max_distance + 1]; got {t.shape} {t.dtype}"
        )
    return RelativeBias(t, (t.shape[1] - 1) // 2)
