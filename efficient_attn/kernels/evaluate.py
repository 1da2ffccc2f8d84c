"""Evaluating a hoisted mod inside a kernel: its jaxpr, with reads of its arrays as loads.

:func:`run` walks the jaxpr of a :class:`~efficient_attn.kernels.closures.Closure`
binding each live equation; an equation that reads a closed-over array (a
:class:`~efficient_attn.kernels.closures.Read`) is replaced by loads from the
array's kernel refs (:class:`Reader`), and only what those loads need is
computed (jnp's index arrays are never concatenated). A :class:`Reader` can
record its loads and replay given values instead, which is how a tile's
``jax.vjp`` takes the reads of float arrays as inputs; :meth:`Reader.add_grads`
adds their cotangents back where they were read.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.extend import core as jcore

from efficient_attn.kernels import closures as cl
from efficient_attn.kernels import layouts


def _get(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _needs(read: cl.Read) -> list:
    """The vars a read needs from the environment (scalar indices; a gather's index arrays)."""
    gathers = read.kind in ("gather", "onehot")
    keep = ("b", "h", "scalar", "vector") if gathers else ("b", "h", "scalar")
    return [v for tag, v in read.index if tag in keep and isinstance(v, jcore.Var)]


def _live(jaxpr, reads: dict, path) -> set[int]:
    """Equations whose outputs reach the result (reads need only their index vars)."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    live = set()
    for k in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[k]
        if not any(v in needed for v in eqn.outvars):
            continue
        live.add(k)
        read = reads.get((*path, k, 0))
        if read is not None and read.kind != "whole":
            needed.update(_needs(read))
        else:
            needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return live


def run(c: cl.Closure, reader: Reader, *args):
    """``c``'s mod at ``args`` (its index arguments, after the score for a score_mod)."""
    return _run(c.jaxpr, c.consts, args, reader, ())[0]


def _run(jaxpr, consts, args, reader: Reader, path):
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for k in sorted(_live(jaxpr, reader.closure.reads, path)):
        eqn = jaxpr.eqns[k]
        marked = [
            i
            for i, v in enumerate(eqn.invars)
            if not isinstance(v, jcore.Literal) and isinstance(env.get(v), cl.Marker)
        ]
        param = cl.CALLS.get(eqn.primitive.name)
        if marked and param is None and reader.closure.reads[(*path, k, marked[0])].kind != "whole":
            env[eqn.outvars[0]] = reader.read((*path, k, 0), env)  # only its index vars are live
            continue
        vals = [_get(env, v) for v in eqn.invars]
        if marked and param is not None:
            inner = eqn.params[param]
            outs = _run(getattr(inner, "jaxpr", inner), getattr(inner, "consts", ()), vals,
                        reader, (*path, k))  # fmt: skip
        else:
            for i in marked:
                vals[i] = reader.read((*path, k, i), env)
            outs = _bind(eqn, vals)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [_get(env, v) for v in jaxpr.outvars]


def _bind(eqn, vals) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    outs = eqn.primitive.bind(*subfuns, *vals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _clamp(x, n: int):
    """An index clamped to ``[0, n)`` (jnp's clip mode; never a load out of bounds)."""
    if isinstance(x, int):
        return min(max(x, 0), n - 1)
    x = jnp.asarray(x).astype(jnp.int32)
    return jnp.minimum(jnp.maximum(x, 0), n - 1)


class Reader:
    """Loads a tile's reads of a closure's arrays from their refs, and adds their gradients.

    ``refs``: per array, ``{role: ref}`` (roles ``"whole"``, ``"smem"``, ``"col"``,
    ``"row"``, ``"tile"``); ``grads``: per array with a gradient, its output ref; ``tile``: the
    :class:`~efficient_attn.kernels.common.TileCtx`. :meth:`record` evaluates the mod
    once, keeping every load; :meth:`replay` evaluates it on those values (the float
    ones replaced by arguments: the inputs of a ``jax.vjp``).
    """

    def __init__(self, closure: cl.Closure, refs, tile, grads=None, interpret: bool = False):
        self.closure, self.refs, self.tile = closure, refs, tile
        self.grads = grads or {}
        self.interpret = interpret
        self._recorded: dict | None = None
        self._replay: dict = {}
        self._index: dict = {}

    def __call__(self, *args):
        """The mod at ``args``, every read loaded."""
        return run(self.closure, self, *args)

    def record(self, *args) -> list:
        """Evaluate the mod, keeping its loads; the keys of the reads that need gradients."""
        self._recorded = {}
        run(self.closure, self, *args)
        return [k for k in self._recorded if self.closure.reads[k].array in self.grads]

    def replay(self, keys, values, *args):
        """The mod at ``args`` with the recorded loads, ``keys``' replaced by ``values``."""
        self._replay = {**self._recorded, **dict(zip(keys, values, strict=True))}
        try:
            return run(self.closure, self, *args)
        finally:
            self._replay = {}

    def recorded(self, keys) -> list:
        return [self._recorded[k] for k in keys]

    def read(self, key, env):
        if key in self._replay:
            return self._replay[key]
        read = self.closure.reads[key]
        value, index = self._load(read, env)
        if self._recorded is not None:
            self._recorded[key], self._index[key] = value, index
        return value

    def _scalars(self, read: cl.Read, env, shape):
        out = []
        for a, (tag, v) in enumerate(read.index):
            if tag in ("b", "h", "scalar"):
                out.append(_clamp(_get(env, v), shape[a]))
            else:
                out.append(v if tag == "static" else None)
        return out

    def _view(self, read: cl.Read, idx):
        """``(ref, index, shape)`` of a view's column ``[bq, 1]`` or row ``[1, bk]``."""
        t, lay = self.tile, self.closure.layouts[read.array]
        axis, q = read.axis, read.side == "q"
        start, size = (t.i0, t.spec.bq) if q else (t.j0, t.spec.bk)
        shape = (size, 1) if q else (1, size)
        if lay.whole:  # Triton: the array itself, its view axis padded
            full = list(idx)
            full[axis] = pl.ds(start, size)
            return self.refs[read.array]["whole"], tuple(full), shape
        lead = [x for a, x in enumerate(idx) if a != axis][1 if lay.per_example else 0 :]
        ref = self.refs[read.array]["col" if q else "row"]
        window = (pl.ds(start, size), slice(None)) if q else (slice(None), pl.ds(start, size))
        return ref, (*lead, *window), shape

    def _load(self, read: cl.Read, env):
        """``(value, index)``: the read's value and where it was read (for its gradient)."""
        lay = self.closure.layouts[read.array]
        refs = self.refs[read.array]
        idx = self._scalars(read, env, lay.shape)
        out = read.out
        if read.kind == "view":
            ref, index, shape = self._view(read, idx)
            x = ref[index].reshape(shape)
        elif read.kind == "tile":  # Mosaic: a dense table's slab
            x = layouts.slab_tile(self.tile, lay.tile.vary, refs["tile"])
            x = x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x  # a dense mask's slab
            x = x.reshape(()) if x.size == 1 else x
        elif read.kind == "onehot":  # Mosaic: a separable table, by one-hot products
            x = self._onehot(read, env, lay, refs["tile"])
        elif read.kind == "point" or (read.kind == "whole" and lay.smem):
            idx = [0] * len(lay.shape) if read.kind == "whole" else idx
            out = lay.shape if read.kind == "whole" else out
            x = refs["smem"][_flat(idx, lay.shape)] if lay.smem else refs["whole"][_at(idx)]
        elif read.kind == "gather":
            idx = self._gather_index(read, env, idx, lay)
            x = self._select(read, idx, lay, refs["smem"]) if lay.smem else refs["whole"][idx]
        elif read.kind == "slice":
            x, out = refs["whole"][_slices(idx, read.sizes, lay.shape)], read.sizes
        else:
            x, out = refs["whole"][...], lay.shape
        x = _restore(x, lay.dtype)
        x = x.reshape((1,) * len(out) if x.ndim == 0 or not out else _fit(x.shape, out))
        return jnp.broadcast_to(x, out) if out else x.reshape(()), idx

    def _gather_index(self, read, env, idx, lay):
        out = []
        for a, (tag, v) in enumerate(read.index):
            if tag == "vector":
                out.append(_clamp(jnp.reshape(_get(env, v), read.out), lay.shape[a]))
            elif tag in ("q", "k"):
                pos = self.tile.qi if tag == "q" else self.tile.ki
                out.append(_clamp(jnp.reshape(pos, read.out), lay.shape[a]))
            else:
                out.append(idx[a])
        return tuple(out)

    def _onehot(self, read, env, lay, ref):
        """A separable table's tile: its row index from the tile's first column, its column
        index from the first row (each depends on one position only)."""
        t, pos = self.tile, {}
        for (tag, v), (side, _) in zip(read.index, lay.tile.index, strict=True):
            if side in ("q", "k"):
                x = t.qi if tag == "q" else t.ki if tag == "k" else _get(env, v)
                pos[side] = jnp.reshape(x, t.shape).astype(jnp.int32)
        fq = jnp.min(pos["q"], axis=1, keepdims=True)
        gk = jnp.min(pos["k"], axis=0, keepdims=True)
        exact = lay.dtype != jnp.bool_
        return layouts.onehot_tile(t, lay.tile, ref, fq, gk, exact)

    def _select(self, read, idx, lay, ref, cot=None):
        """Mosaic's gather from a small SMEM table: one select per entry along the gathered
        axes (:func:`~efficient_attn.kernels.closures.selects`). With ``cot``: add its sums
        where each entry was read into ``ref`` (a per-program gradient copy ``[1, size]``)."""
        axes = [a for a, (tag, _) in enumerate(read.index) if tag in cl.GATHERED]
        strides = [math.prod(lay.shape[a + 1 :]) for a in range(len(lay.shape))]
        base = _flat([0 if a in axes else x for a, x in enumerate(idx)], lay.shape)

        def body(e, x):
            hit, at, rest = None, base, e
            for a in reversed(axes):
                n = lay.shape[a]
                entry, rest = jax.lax.rem(rest, n), jax.lax.div(rest, n)
                at = at + entry * strides[a]
                hit = idx[a] == entry if hit is None else hit & (idx[a] == entry)
            if cot is None:
                return jnp.where(hit, ref[at], x)
            ref[0, at] = ref[0, at] + jnp.sum(jnp.where(hit, cot, 0.0))
            return x

        init = jnp.zeros(read.out, ref.dtype)
        return jax.lax.fori_loop(0, cl.selects(read, lay.shape), body, init)

    # ---- gradients ---------------------------------------------------------------------

    def add_grads(self, keys, cots) -> None:
        """Add the cotangents ``cots`` of the recorded reads ``keys`` to their gradient outputs."""
        for key, cot in zip(keys, cots, strict=True):
            read = self.closure.reads[key]
            lay = self.closure.layouts[read.array]
            ref, idx = self.grads[read.array], self._index[key]
            cot = cot.astype(jnp.float32)
            if lay.grad == "row":
                lead = [x for a, x in enumerate(idx) if a != read.axis]
                row = jnp.sum(cot.reshape(self.tile.shape), axis=0, keepdims=True)
                at = (*lead, slice(None), slice(None))
                ref[at] = ref[at] + row
            elif lay.grad == "tile":  # the dK/dV kernel's column slab
                self._add_to_slab(lay.tile.vary, ref, cot)
            elif lay.grad == "partial" and read.kind == "gather":  # Mosaic's SMEM table
                self._select(read, idx, lay, ref, cot.reshape(read.out))
            elif lay.grad == "partial":
                at = (0, _flat(idx, lay.shape)) if lay.smem else _at(idx)
                ref[at] = ref[at] + jnp.sum(cot)
            else:
                self._atomic(read, ref, idx, cot, lay)

    def _add_to_slab(self, vary, ref, cot) -> None:
        """Add a table read's cotangent to the key tile's column slab ``[G|1, Tq_pad|1, bk]``
        (summed over what the table broadcasts along; one along keys goes to column 0)."""
        t = self.tile
        bk = t.shape[1]
        ds = cot.reshape(t.shape) if cot.size > 1 else cot.reshape(1, 1)
        if not vary[2] and ds.shape[0] > 1:
            ds = jnp.sum(ds, axis=0, keepdims=True)
        if not vary[3]:
            ds = jnp.sum(ds, axis=1, keepdims=True)
            first = jax.lax.broadcasted_iota(jnp.int32, (ds.shape[0], bk), 1) == 0
            ds = jnp.where(first, ds, 0.0)
        g = jax.lax.rem(t.h, t.spec.groups)
        layouts.add_to_column_slab(t.spec, vary, ref, g, t.i, ds)

    def _atomic(self, read, ref, idx, cot, lay) -> None:
        """Triton: add ``cot`` where ``read`` read, atomically (one buffer for every program)."""
        from jax.experimental.pallas import triton as plgpu

        if read.kind == "view":
            _, index, shape = self._view(read, idx)
            val = jnp.sum(cot.reshape(self.tile.shape), axis=1 if shape[1] == 1 else 0)
        elif read.kind == "point":
            index, val = _at(idx), jnp.sum(cot).reshape(() if idx else (1,))
        elif read.kind == "gather":
            index, val = idx, cot.reshape(read.out)
        elif read.kind == "slice":
            index, val = _slices(idx, read.sizes, lay.shape), cot.reshape(read.sizes)
        else:
            index = tuple(pl.ds(0, d) for d in lay.shape) or (pl.ds(0, 1),)
            val = cot.reshape(lay.shape or (1,))
        if self.interpret and read.kind == "gather":  # the interpreter's atomics drop repeats
            ref[...] = ref[...].at[index].add(val)
        else:
            plgpu.atomic_add(ref, index, val)


def _at(idx):
    """A point's index; 0-d arrays are stored as ``[1]``."""
    return tuple(idx) if idx else (0,)


def _restore(x, dtype):
    return x != 0 if dtype == jnp.bool_ else x.astype(dtype)


def _fit(shape, out):
    """``shape`` (a loaded slice) padded with unit dims to the rank of ``out``."""
    return (1,) * (len(out) - len(shape)) + tuple(shape)


def _flat(idx, shape) -> Any:
    strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
    flat = 0
    for x, s in zip(idx, strides, strict=True):
        flat = flat + x * s
    return flat


def _slices(idx, sizes, shape):
    return tuple(pl.ds(_clamp(x, n - s + 1) if not isinstance(x, int) else min(x, n - s), s)
                 for x, s, n in zip(idx, sizes, shape, strict=True))  # fmt: skip


# ---- what a backend can lower --------------------------------------------------------


class _Stub:
    """A reader returning zeros: the mod's computation without its loads."""

    def __init__(self, closure: cl.Closure):
        self.closure = closure

    def read(self, key, env):
        r = self.closure.reads[key]
        lay = self.closure.layouts[r.array]
        shape = lay.shape if r.kind == "whole" else r.sizes if r.kind == "slice" else r.out
        return jnp.zeros(shape, lay.dtype)


def _rules(backend: str):
    """The Pallas backend's lowering rules (private to JAX: None if they moved)."""
    try:
        if backend == "gpu":
            from jax._src.pallas.triton import lowering

            return lowering.triton_lowering_rules
        from jax._src.pallas.mosaic import lowering

        return lowering.lowering_rules[next(iter(lowering.lowering_rules))]
    except (ImportError, AttributeError, StopIteration):  # pragma: no cover
        return None


def check_values(c: cl.Closure, backend: str) -> None:
    """Trace ``c`` as the kernel evaluates it (loads stubbed): :class:`Unsupported` if it
    computes what ``backend`` cannot lower (an op without a rule; on Triton a shape that is
    not a power of two)."""
    jaxpr = jax.make_jaxpr(lambda *a: run(c, _Stub(c), *a))(*c.example)
    _walk(jaxpr.jaxpr, _rules(backend), backend, c.name)


def _walk(jaxpr, rules, backend: str, name: str) -> None:
    for eqn in jaxpr.eqns:
        if rules is not None and eqn.primitive not in rules:
            raise cl.Unsupported(
                f"{name} computes {eqn.primitive.name}, which the {backend} kernels cannot lower "
                "(e.g. indexing a value rather than a closed-over array)"
            )
        for v in eqn.outvars if backend == "gpu" else ():
            shape = getattr(v.aval, "shape", ())
            if any(d & (d - 1) for d in shape):
                raise cl.Unsupported(
                    f"{name} computes a value of shape {shape} (Triton's shapes must be powers "
                    "of two)"
                )
        for sub in jcore.jaxprs_in_params(eqn.params):
            _walk(sub, rules, backend, name)
