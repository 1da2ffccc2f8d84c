"""The mod protocol: :class:`Mask` and :class:`Score`, their pytree helper and combinators.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and a ``score_mod(score, b, h,
q_idx, kv_idx) -> score`` (Dong et al. 2024, "FlexAttention"). The library's
mods subclass :class:`Mask` / :class:`Score` and are frozen dataclasses
registered as pytrees by :func:`_pytree`. The combinators live here too:
``Mask.__and__`` / ``__or__`` build them, so they share the base classes' module.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MaskMod = Callable[[Any, Any, Any, Any], Any]
ScoreMod = Callable[[Any, Any, Any, Any, Any], Any]


def _pytree(*data: str):
    """Register a frozen dataclass as a pytree: ``data`` fields are leaves, the rest static."""

    def wrap(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
        meta = [f for f in fields if f not in data]
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=meta)

    return wrap


def _int(name: str, value: Any, minimum: int = 0) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


class Mask:
    """Base of the library's mask mods: callable ``(b, h, q_idx, kv_idx) -> bool``; ``&``, ``|``.

    A mask over positions only may also give :meth:`tile_bounds`, which lets a
    block mask classify most tiles without evaluating them.
    """

    def __call__(self, b, h, q_idx, kv_idx):
        raise NotImplementedError

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        """``(may, must)`` bool arrays over tiles spanning positions ``[q_lo, q_hi] x [k_lo, k_hi]``
        (NumPy, broadcastable): ``may`` False proves a tile empty, ``must`` True proves it full.
        None: no bounds (every tile is evaluated)."""
        return None

    def row_intervals(self, b, h, q_idx, kv_idx):
        """The visible keys of every query row as one run of the key order, or None.

        The data-mask counterpart of :meth:`tile_bounds` (jnp, traced data welcome):
        ``b [Bm]``, ``h [Hm]``, ``q_idx [Tq]`` and ``kv_idx [Tk]`` are int32 indices
        (both ascending). Return ``(lo, hi, exact)``: int arrays broadcastable to
        ``[Bm, Hm, Tq]`` such that query ``q_idx[i]`` sees key ``kv_idx[j]`` iff
        ``lo[..., i] <= j < hi[..., i]``, non-decreasing along ``i``, and a bool
        scalar that is False where the data break that promise (e.g. unsorted
        segment ids). A block mask then classifies every tile from prefix sums of
        the runs, in O(Tq log Tk + nq nk log bq) instead of evaluating all
        ``Tq * Tk`` pairs, with the same result (when ``exact`` is False it falls
        back to evaluating every pair). ``&`` of masks with runs has runs.
        None (the default): no runs, every pair is evaluated.
        """
        return None

    def __and__(self, other: MaskMod) -> Mask:
        return and_masks(self, other)

    def __or__(self, other: MaskMod) -> Mask:
        return or_masks(self, other)


class Score:
    """Base of the library's score mods: callable ``(score, b, h, q_idx, kv_idx) -> score``."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        raise NotImplementedError


# ---- combinators ---------------------------------------------------------------


@_pytree("mods")
@dataclasses.dataclass(frozen=True)
class _AndMasks(Mask):
    mods: tuple

    def __call__(self, b, h, q_idx, kv_idx):
        return functools.reduce(operator.and_, (m(b, h, q_idx, kv_idx) for m in self.mods))

    def tile_bounds(self, *span):
        bounds = [_bounds(m, span) for m in self.mods]
        return (
            functools.reduce(np.logical_and, (b[0] for b in bounds)),
            functools.reduce(np.logical_and, (b[1] for b in bounds)),
        )

    def row_intervals(self, b, h, q_idx, kv_idx):
        runs = [m.row_intervals(b, h, q_idx, kv_idx) if isinstance(m, Mask) else None
                for m in self.mods]  # fmt: skip
        if any(r is None for r in runs):
            return None
        lo = functools.reduce(jnp.maximum, (r[0] for r in runs))  # the intersection of runs
        hi = functools.reduce(jnp.minimum, (r[1] for r in runs))
        return lo, hi, functools.reduce(jnp.logical_and, (r[2] for r in runs))


@_pytree("mods")
@dataclasses.dataclass(frozen=True)
class _OrMasks(Mask):
    mods: tuple

    def __call__(self, b, h, q_idx, kv_idx):
        return functools.reduce(operator.or_, (m(b, h, q_idx, kv_idx) for m in self.mods))

    def tile_bounds(self, *span):
        bounds = [_bounds(m, span) for m in self.mods]
        return (
            functools.reduce(np.logical_or, (b[0] for b in bounds)),
            functools.reduce(np.logical_or, (b[1] for b in bounds)),
        )


def _bounds(mod, span):
    """``mod``'s tile bounds, or the trivial ones (may be visible, not proven full)."""
    b = mod.tile_bounds(*span) if isinstance(mod, Mask) else None
    return (np.True_, np.False_) if b is None else b


def _mods(kind: str, mods: tuple) -> tuple:
    if not mods or not all(callable(m) for m in mods):
        raise ValueError(f"{kind} needs one or more callables; got {mods!r}")
    return tuple(mods)


def and_masks(*mods: MaskMod) -> Mask:
    """A pair is visible iff every mask in ``mods`` allows it."""
    return _AndMasks(_mods("and_masks", mods))


def or_masks(*mods: MaskMod) -> Mask:
    """A pair is visible iff any mask in ``mods`` allows it."""
    return _OrMasks(_mods("or_masks", mods))


@_pytree("mods")
@dataclasses.dataclass(frozen=True)
class _ChainScores(Score):
    mods: tuple

    def __call__(self, score, b, h, q_idx, kv_idx):
        for m in self.mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score


def chain_scores(*mods: ScoreMod) -> Score:
    """Apply the score mods in order (e.g. a bias, then a soft-cap)."""
    return _ChainScores(_mods("chain_scores", mods))


@_pytree("mod")
@dataclasses.dataclass(frozen=True)
class _Not(Mask):
    mod: Any

    def __call__(self, b, h, q_idx, kv_idx):
        return ~self.mod(b, h, q_idx, kv_idx)

    def tile_bounds(self, *span):
        may, must = _bounds(self.mod, span)
        return ~must, ~may


def invert_mask(mod: MaskMod) -> Mask:
    """The pairs ``mod`` hides."""
    return _Not(_mods("invert_mask", (mod,))[0])
