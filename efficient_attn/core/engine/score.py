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
        return jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=acc)

    def vjp(self, params, q_i, k_j, ds, acc):
        ds = ds.astype(q_i.dtype)
        dq = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=acc)
        dk = jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=acc)
        return dq, dk, None


DOT = DotScore()
