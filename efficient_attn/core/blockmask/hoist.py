"""Hoisting a mod: trace it at fixed index shapes and make the arrays it closes over arguments.

The tile engine passes those arrays (segment ids, learned bias tables) through
its ``custom_vjp`` explicitly, so gradients reach them; the traced output also
says which index arguments the mod reads and checks a mask returns booleans.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core.mods.base import Mask, Score


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
        raise ValueError(
            f"{name} failed on broadcastable int32 index arrays (it must be a jnp expression of "
            "them and of arrays it closes over: pass jnp or NumPy arrays, not Python objects JAX "
            f"cannot trace): {e}"
        ) from e
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


# ---- closures as pytrees: the arrays a plain function closes over become its leaves -----------


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


def _score_dtypes() -> tuple[Any, ...]:
    """The dtypes a score may have here: float32, and float64 where x64 is enabled."""
    x64 = jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64
    return (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)) if x64 else (jnp.dtype(jnp.float32),)


@dataclasses.dataclass(frozen=True, eq=False)
class _Lifted:
    """A mod traced once at scalar indices (FlexAttention's model: a mod is a function of one
    ``(b, h, q_idx, kv_idx)``), evaluated at any broadcastable indices with ``jnp.vectorize``
    (vmap over the dims where an index varies, so ``seg[b, q_idx]`` stays a row gather)."""

    fn: Any  # the user's mod (static: identifies the lifted mod)
    jaxprs: tuple  # its jaxpr at scalar indices, one per score dtype (masks: one)
    slots: tuple  # per jaxpr: the positions of its consts in ``arrays``
    uses: tuple[bool, ...]  # which arguments it reads
    arrays: tuple  # the arrays it closes over: the pytree's leaves

    def _eval(self, args):
        which = 0
        if len(args) == 5:  # a score mod: the jaxpr of the score's dtype
            dtypes, dtype = _score_dtypes(), jnp.result_type(args[0])
            which = dtypes.index(dtype) if dtype in dtypes[: len(self.jaxprs)] else 0
        jaxpr = self.jaxprs[which]
        consts = [self.arrays[i] for i in self.slots[which]]
        zeros = [jnp.zeros((), v.aval.dtype) for v in jaxpr.invars]
        used = [jnp.asarray(a) for a, u in zip(args, self.uses, strict=True) if u]

        def scalar(*vals):
            it = iter(vals)
            full = [next(it) if u else z for u, z in zip(self.uses, zeros, strict=True)]
            return jax.core.eval_jaxpr(jaxpr, consts, *full)[0]

        return jnp.vectorize(scalar)(*used) if used else scalar()


_LIFTED_META = ["fn", "jaxprs", "slots", "uses"]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["arrays"], meta_fields=_LIFTED_META
)
@dataclasses.dataclass(frozen=True, eq=False)
class _LiftedMask(_Lifted, Mask):
    def __call__(self, b, h, q_idx, kv_idx):
        return self._eval((b, h, q_idx, kv_idx))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["arrays"], meta_fields=_LIFTED_META
)
@dataclasses.dataclass(frozen=True, eq=False)
class _LiftedScore(_Lifted, Score):
    def __call__(self, score, b, h, q_idx, kv_idx):
        return self._eval((score, b, h, q_idx, kv_idx))


def lift(name: str, mod: Any) -> Any:
    """``mod`` as a pytree mod whose leaves are every array it closes over (concrete or traced).

    Library mods (:class:`~efficient_attn.core.mods.Mask`/``Score`` pytrees whose leaves are
    all arrays) come back as they are. Any other callable (a plain ``lambda b, h, q_idx,
    kv_idx: seg[b, q_idx] == seg[b, kv_idx]``) is traced once at scalar int32 indices (and
    a scalar score) and the arrays it closes over become leaves: what a ``custom_vjp``,
    ``jit`` or ``shard_map`` takes as inputs (replicated to every shard, differentiated as
    arguments). ``name`` is ``"mask_mod"`` or ``"score_mod"``; a mod that fails on traced
    scalar indices (e.g. indexing a Python list with them) is a ``ValueError``.
    """
    if mod is None:
        return None
    if not callable(mod):
        raise ValueError(f"{name} must be a callable; got {mod!r}")
    if isinstance(mod, Mask | Score) and all(_is_array(x) for x in jax.tree.leaves(mod)):
        return mod
    idx = [np.zeros((), np.int32)] * 4
    examples = [idx] if name == "mask_mod" else [[np.zeros((), d), *idx] for d in _score_dtypes()]
    closed = []
    for example in examples:
        try:
            closed.append(jax.make_jaxpr(mod)(*example))
        except (TypeError, IndexError, jax.errors.ConcretizationTypeError) as e:
            raise ValueError(
                f"{name} must be a jnp expression of its int32 index arguments and of arrays it "
                "closes over (pass jnp or NumPy arrays, not Python objects JAX cannot trace); "
                f"tracing it at scalar indices failed: {e}"
            ) from e
        if len(closed[-1].out_avals) != 1 or closed[-1].out_avals[0].shape != ():
            raise ValueError(
                f"{name} must return one value per (b, h, q_idx, kv_idx); at scalar indices it "
                f"returned {closed[-1].out_avals}"
            )
    arrays, slots = [], []  # the float64 trace may close over other arrays: the union
    for c in closed:
        slot = []
        for x in c.consts:
            hit = [i for i, y in enumerate(arrays) if y is x]
            slot.append(hit[0] if hit else len(arrays))
            if not hit:
                arrays.append(x)
        slots.append(tuple(slot))
    used = set()
    for eqn in closed[0].jaxpr.eqns:
        used.update(id(v) for v in eqn.invars)
    used.update(id(v) for v in closed[0].jaxpr.outvars)
    uses = tuple(id(v) in used for v in closed[0].jaxpr.invars)
    cls = _LiftedMask if name == "mask_mod" else _LiftedScore
    jaxprs = tuple(c.jaxpr for c in closed)
    return cls(fn=mod, jaxprs=jaxprs, slots=tuple(slots), uses=uses, arrays=tuple(arrays))


def split_mod(name: str, mod: Any) -> tuple[tuple, Any]:
    """``(array leaves, static rest)`` of :func:`lift` ``(name, mod)``; None: ``((), None)``."""
    if mod is None:
        return (), None
    leaves, treedef = jax.tree.flatten(lift(name, mod))
    return tuple(leaves), treedef


def join_mod(static: Any, leaves: tuple) -> Any:
    """The mod :func:`split_mod` split, rebuilt from (possibly other) ``leaves``."""
    return None if static is None else jax.tree.unflatten(static, leaves)
