"""Hoisting a mod: trace it at fixed index shapes and make the arrays it closes over arguments.

The tile engine passes those arrays (segment ids, learned bias tables) through
its ``custom_vjp`` explicitly, so gradients reach them; the traced output also
says which index arguments the mod reads and checks a mask returns booleans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Hoisted:
    """A mod traced at fixed argument shapes, with the tracers it closes over made arguments.

    ``fn(*args, *consts)`` evaluates the mod; ``consts`` are the closed-over
    tracers (captured buffers: segment ids, learned tables), which the tile
    engine passes through its ``custom_vjp`` explicitly so gradients reach
    them (what ``jax.closure_convert`` does, also for integer arrays).
    """

    fn: Callable[..., Any]
    consts: tuple[Any, ...]
    out: jax.ShapeDtypeStruct
    uses: tuple[bool, ...]  # which positional arguments the mod reads
    closed: Any = None  # the traced jaxpr with all its constants (the fused kernels evaluate it)

    @property
    def static(self) -> bool:
        """True when the mod depends on nothing but its arguments (no traced data)."""
        return not self.consts


def hoist(name: str, fn: Callable[..., Any], *example: Any) -> Hoisted:
    """Trace ``fn(*example)`` (arrays) into a :class:`Hoisted`; non-array output: ``ValueError``."""
    if not callable(fn):
        raise ValueError(f"{name} must be a callable; got {fn!r}")
    try:
        closed = jax.make_jaxpr(fn)(*example)
    except (TypeError, IndexError) as e:
        raise ValueError(f"{name} failed on broadcastable int32 index arrays: {e}") from e
    if len(closed.out_avals) != 1:
        raise ValueError(f"{name} must return one array; it returned {len(closed.out_avals)}")
    jaxpr, consts = closed.jaxpr, list(closed.consts)
    traced = [i for i, c in enumerate(consts) if isinstance(c, jax.core.Tracer)]
    fixed = [None if i in traced else c for i, c in enumerate(consts)]
    n = len(example)

    def converted(*args):
        values = list(fixed)
        for i, c in zip(traced, args[n:], strict=True):
            values[i] = c
        return jax.core.eval_jaxpr(jaxpr, values, *args[:n])[0]

    used = set()
    for eqn in jaxpr.eqns:
        used.update(id(v) for v in eqn.invars)
    used.update(id(v) for v in jaxpr.outvars)
    uses = tuple(id(v) in used for v in jaxpr.invars)
    aval = closed.out_avals[0]
    out = jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    return Hoisted(converted, tuple(consts[i] for i in traced), out, uses, closed)


def check_mask_output(out: jax.ShapeDtypeStruct, shape: tuple[int, ...]) -> None:
    """A ``mask_mod`` must return booleans broadcastable to the index shape."""
    if out.dtype != jnp.bool_:
        raise ValueError(
            f"mask_mod must return a boolean array (e.g. kv_idx <= q_idx); it returned {out.dtype}"
        )
    try:
        np.broadcast_shapes(out.shape, shape)
    except ValueError:
        raise ValueError(
            f"mask_mod returned shape {out.shape}, not broadcastable to its indices' {shape}"
        ) from None
