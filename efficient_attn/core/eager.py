"""Eager calls of a method run as one compiled program.

Called outside ``jax.jit``, a method's function would run operation by
operation: every reshape, pad and einsum of the engine is dispatched, and
compiled the first time its shapes are seen, on its own. :func:`compiled_call`
traces the whole method once instead, with ``q``, ``k``, ``v`` as the program's
arguments and everything else (options, mods and the arrays they close over,
key lengths, bias) closed over, exactly as an eager call sees them: concrete
arrays stay concrete, so a NumPy mask still builds its block mask on the host.
Inside a trace (``jit``, ``grad``, ``vmap``) the nested ``jit`` is inlined.

Programs are kept (the last :data:`CACHE_SIZE`) for calls whose closed-over
values are hashable, JAX arrays (immutable: keyed by identity and held alive by
the entry, or by contents up to :data:`SMALL_BYTES`) or NumPy arrays of at most
:data:`CACHE_MAX_BYTES` in all (keyed by their contents, as they may be changed
in place), so an eager loop over new
``q``, ``k``, ``v`` with the same options and mods compiles once per shape. A
call that closes over a plain function (a user's ``mask_mod`` closure, which
may read arrays that change) or over tracers is compiled afresh each time.
"""

from __future__ import annotations

import collections
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

#: Compiled eager calls kept.
CACHE_SIZE = 32
#: NumPy arrays larger than this (in total) make a call uncached.
CACHE_MAX_BYTES = 1 << 22
#: JAX arrays up to this size are keyed by contents (made afresh per call, as key lengths
#: are), larger ones by identity.
SMALL_BYTES = 1 << 16

_CACHE: collections.OrderedDict[Any, Callable] = collections.OrderedDict()
_CONTEXT: list[Callable[[], Any]] = []


def register_trace_context(read: Callable[[], Any]) -> None:
    """Make ``read()`` (hashable) part of every cache key: a setting of a higher layer that
    changes what a call traces (e.g. :func:`efficient_attn.kernels.kernel_branches`)."""
    _CONTEXT.append(read)


def _small_contents(x: jax.Array) -> jax.Array | np.ndarray:
    """A small JAX array's host copy (keyed by contents), else the array (keyed by identity;
    also typed PRNG keys and arrays spread over other processes)."""
    if x.nbytes > SMALL_BYTES or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError, ValueError):
        return x


def _key(fn: Callable, kwargs: dict[str, Any]) -> tuple[Any, tuple] | None:
    """A hashable key for ``fn`` with ``kwargs`` closed over, and the objects it names by
    identity; None when the call should not be cached (tracers, large or unhashable)."""
    leaves, treedef = jax.tree_util.tree_flatten(kwargs)
    parts: list[Any] = []
    alive: list[Any] = []
    size = 0
    for x in leaves:
        if isinstance(x, (jax.core.Tracer, types.FunctionType, types.MethodType)):
            return None
        if isinstance(x, jax.Array):
            x = _small_contents(x)
        if isinstance(x, jax.Array):
            parts.append(("array", id(x)))
            alive.append(x)
        elif isinstance(x, np.ndarray):
            size += x.nbytes
            if size > CACHE_MAX_BYTES or x.dtype == object:
                return None
            parts.append(("numpy", x.shape, x.dtype.str, x.tobytes()))
        else:
            try:
                hash(x)
            except TypeError:
                return None
            parts.append((type(x), x))
    try:
        key = (fn, treedef, tuple(parts), tuple(read() for read in _CONTEXT))
        hash(key)
    except TypeError:
        return None
    return key, tuple(alive)


def compiled_call(fn: Callable, q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
    """``fn(q, k, v, **kwargs)`` as one ``jax.jit`` program (see the module docstring)."""
    keyed = _key(fn, kwargs)
    if keyed is not None and keyed[0] in _CACHE:
        _CACHE.move_to_end(keyed[0])
        return _CACHE[keyed[0]](q, k, v)

    def call(q, k, v):
        return fn(q, k, v, **kwargs)

    program = jax.jit(call)
    if keyed is not None:
        alive = keyed[1]
        program = _Kept(program, alive)
        _CACHE[keyed[0]] = program
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return program(q, k, v)


class _Kept:
    """A jitted program and the objects its cache key names by identity, kept alive so that
    no other object can take their ``id`` while the entry exists."""

    def __init__(self, program: Callable, alive: tuple):
        self.program, self.alive = program, alive

    def __call__(self, *args: Any) -> Any:
        return self.program(*args)
