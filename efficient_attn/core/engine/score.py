"""The pluggable score of the tile engine: how a tile of logits is computed.

:class:`Score` is the interface (unscaled logits of a query tile against a key
tile, and their vector-Jacobian product); :data:`DOT` is the dot product of
Vaswani et al. 2017. Other scores (``additive``'s) subclass :class:`Score`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


class Score:
    """How a tile of unscaled logits is computed from a query tile and a key tile.

    Tiles: ``q_i [B, K, G, bq, D]`` (queries grouped by their K/V head),
    ``k_j [B, K, bk, D]``; logits ``[B, K, G, bq, bk]`` in the statistics dtype
    ``acc``. ``params`` is a pytree of arrays the score depends on (None for
    the dot product), differentiated like q and k. Subclasses are frozen
    dataclasses (hashable: they are static arguments of jitted kernels).
    """

    #: True when ``score(q, k)`` is linear in ``q``: then d(scale) is read off
    #: dq instead of being accumulated tile by tile.
    linear_in_q: bool = False

    def logits(self, params: Any, q_i: jax.Array, k_j: jax.Array, acc: Any) -> jax.Array:
        """Unscaled logits ``[B, K, G, bq, bk]`` of one query tile against one key tile."""
        raise NotImplementedError

    def vjp(
        self, params: Any, q_i: jax.Array, k_j: jax.Array, ds: jax.Array, acc: Any
    ) -> tuple[jax.Array, jax.Array, Any]:
        """``(dq_i, dk_j, dparams)`` for the cotangent ``ds`` of :meth:`logits` (in ``acc``)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DotScore(Score):
    """``q . k`` (Vaswani et al. 2017)."""

    linear_in_q = True

    def logits(self, params, q_i, k_j, acc):
        return rows_matmul("bkqh,bksh->bkqs", q_i, k_j, acc)

    def vjp(self, params, q_i, k_j, ds, acc):
        ds = ds.astype(q_i.dtype)
        dq = rows_matmul("bkqs,bksh->bkqh", ds, k_j, acc)
        dk = rows_matmul("bkqs,bkqh->bksh", ds, q_i, acc)
        return dq, dk, None

    def vjp_t(self, q_t, k_j, ds, acc):
        """``(dq_i, dk_j^T)`` from ``q_t = rows_t(q_i)``: the key gradient as ``Q^T dS``
        (``[B, K, H, bk]``), a matmul of row-major operands, where ``dS^T Q`` (the
        transposed left operand) runs at about half speed on XLA's CPU backend."""
        ds = ds.astype(q_t.dtype)
        return rows_matmul("bkqs,bksh->bkqh", ds, k_j, acc), t_matmul(q_t, ds, acc)


def rows_matmul(spec: str, a: jax.Array, b: jax.Array, acc: Any) -> jax.Array:
    """``einsum(spec)`` of tiles whose query rows are ``[..., G, bq, X]`` (a, and b when its
    spec has ``q``), with the ``G`` query heads of a K/V head folded into the rows.

    ``spec`` names the folded operands ``bkqX``: one ``[B*K]``-batched matmul with
    ``G * bq`` rows, whose result is a bitcast of the tile layout (no copy per tile, as
    XLA's CPU backend makes for a 5-D dot with a unit ``G``).
    """
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    g_bq = a.shape[2:4]
    flat = [x.reshape(*x.shape[:2], -1, x.shape[-1]) if "q" in name else x
            for x, name in ((a, lhs), (b, rhs))]  # fmt: skip
    y = jnp.einsum(spec, *flat, preferred_element_type=acc)
    return y.reshape(*y.shape[:2], *g_bq, y.shape[-1]) if "q" in out else y


DOT = DotScore()


def rows_t(x: jax.Array) -> jax.Array:
    """Query-row tiles ``[..., B, K, G, bq, D]`` -> ``[..., B, K, D, G*bq]``."""
    return jnp.swapaxes(x.reshape(*x.shape[:-3], -1, x.shape[-1]), -1, -2)


def t_matmul(a_t: jax.Array, p: jax.Array, acc: Any) -> jax.Array:
    """``a^T p`` of ``a_t [B, K, D, G*bq]`` (:func:`rows_t`) and ``p [B, K, G, bq, bk]``:
    ``[B, K, D, bk]``."""
    p = p.reshape(*p.shape[:2], -1, p.shape[-1])
    return jnp.einsum("bkdq,bkqs->bkds", a_t, p, preferred_element_type=acc)
