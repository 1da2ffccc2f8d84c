"""The arrays a mod closes over, as inputs of the fused kernels.

A ``mask_mod``/``score_mod`` (a library mod or any Python closure) is hoisted at
the kernel's tile shapes (:func:`efficient_attn.core.blockmask.hoist`, as the XLA
engine does; FlexAttention's captured buffers, Dong et al. 2024): its jaxpr and
every array it closes over, concrete or traced. The arrays become kernel inputs,
and the kernel evaluates the jaxpr (:mod:`efficient_attn.kernels.evaluate`) with
each *read* of an array turned into loads (Mosaic has no gather, Triton none on
values):

* ``view``: ``arr[.., q_idx, ..]`` / ``arr[.., kv_idx, ..]`` with scalar other indices
  (segment ids, per-token biases): the tile's column ``[bq, 1]`` or row ``[1, bk]``,
  ``bq + bk`` loads;
* ``point``: every index a scalar (``slopes[h]``, ``prefix[b]``): one load (SMEM on TPU);
* ``gather``: other point gathers (``table[h, q - k]``): a pointer gather on Triton; on
  Mosaic (no gather) a table of at most ``SELECT_LIMIT`` entries along its gathered axes,
  in SMEM, read by one select per entry; larger ones dense (``m[b, h, q_idx, kv_idx]``,
  blocked like the dense bias), separable (``tab[q_idx // bs, kv_idx // bs]``, by one-hot
  products) or expanded outside the kernels (:mod:`efficient_attn.kernels.layouts`,
  which plans each backend's :class:`Layout`);
* ``slice`` and ``whole``: a slice, or any other use of the array (Triton only).

Gradients of the float arrays a ``score_mod`` closes over (:class:`Layout` ``grad``):
the tile's reads are inputs of its ``jax.vjp`` and their cotangents are added back
where they were read: ``"row"`` (only key views) into the key tile's rows of a
per-program buffer, ``"partial"`` (only point reads) into a per-program copy of the
array, ``"tile"`` (Mosaic's dense tables) into the key tile's columns of a per-program
buffer like the bias's, all summed outside the kernel (deterministic); ``"atomic"``
(anything else, Triton only) by atomic adds into one buffer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from efficient_attn.core import blockmask as _bm


class Unsupported(Exception):
    """Raised while preparing a call the fused kernels cannot run; the message says why."""


#: Ops an index passes through unchanged (shape only, or an int cast).
_SHAPE_OPS = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims",
                        "convert_element_type"})  # fmt: skip
#: Call primitives inlined when a closed-over array flows into them: their jaxpr param.
CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "remat": "jaxpr",
         "checkpoint": "jaxpr"}  # fmt: skip
#: Most elements of an array read through SMEM on TPU.
SMEM_LIMIT = 4096
#: Most entries a gather from an SMEM table selects among on TPU (one select each per tile).
SELECT_LIMIT = 64
#: Index tags of a gather's gathered (non-scalar) axes.
GATHERED = ("vector", "q", "k")
#: Index arguments of a mask_mod / score_mod (after the score).
_ARGS = ("b", "h", "q", "k")


@dataclasses.dataclass(frozen=True, eq=False)
class Read:
    """One read of a closed-over array in the mod's jaxpr.

    ``index``: per array axis, the source of its index: ``("q"|"k", None)`` the tile's
    positions, ``(tag, var)`` a scalar (``tag`` ``"b"`` when it is the batch index),
    ``("vector", var)`` another index array (gathers); slices: the start vars.
    """

    kind: str  # "view" | "point" | "gather" | "slice" | "whole"
    array: int
    index: tuple[Any, ...] = ()
    sizes: tuple[int, ...] = ()  # slice sizes
    out: tuple[int, ...] = ()  # the read's output shape
    deps: tuple = ()  # a gather's: per axis, the tile positions its index is computed from

    @property
    def axis(self) -> int | None:
        """A view's position axis."""
        sides = [a for a, (tag, _) in enumerate(self.index) if tag in ("q", "k")]
        return sides[0] if self.kind == "view" else None

    @property
    def side(self) -> str | None:
        return None if self.axis is None else self.index[self.axis][0]


class Marker:
    """Stands for closed-over array ``n`` in an environment of the evaluator."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


def _var(v):
    """``v`` if it is a variable (a key of the maps here), else None (a literal)."""
    return None if isinstance(v, jcore.Literal) else v


def _rank(v) -> int:
    return len(v.aval.shape)


def _is_literal(v, value) -> bool:
    return isinstance(v, jcore.Literal) and np.ndim(v.val) == 0 and v.val == value


def _source(var, producers, args, tile):
    """Follow an index back through shape ops and jnp's negative-index wrap to its source:
    ``("q"|"k", None)``, ``("b"|"h"|"scalar", var)`` for a rank-0 value, else ``None``."""
    scalar = var if not isinstance(var, jcore.Literal) and _rank(var) == 0 else None
    while not isinstance(var, jcore.Literal):
        if var in args:
            name = args[var]
            if name == "const":  # a closed-over value
                break
            if name in ("q", "k"):
                return (name, None)
            return (name, var)
        if scalar is None and _rank(var) == 0:
            scalar = var
        shape = tuple(d for d in var.aval.shape if d != 1)
        if scalar is None and shape != tile:
            return None
        eqn = producers.get(var)
        if eqn is None:
            break
        name = eqn.primitive.name
        if name in _SHAPE_OPS and jnp.issubdtype(var.aval.dtype, jnp.integer):
            var = eqn.invars[0]
        elif name == "select_n" and _wraps(eqn, producers):
            var = eqn.invars[1]
        else:
            break
    return None if scalar is None else ("scalar", scalar)


def _wraps(eqn, producers) -> bool:
    """``select_n(x < 0, x, x + n)``: jnp's negative-index wrap (the identity on indices >= 0)."""
    pred, x, y = eqn.invars
    p, a = producers.get(_var(pred)), producers.get(_var(y))
    return (
        p is not None and p.primitive.name == "lt" and p.invars[0] is x
        and _is_literal(p.invars[1], 0) and a is not None and a.primitive.name == "add"
        and x in a.invars
    )  # fmt: skip


def _constant(var, producers) -> int | None:
    """The value of an index that is a broadcast literal (``m[0, q_idx, kv_idx]``), else None."""
    while not isinstance(var, jcore.Literal):
        eqn = producers.get(var)
        if eqn is None or eqn.primitive.name not in _SHAPE_OPS:
            return None
        var = eqn.invars[0]
    return int(var.val) if np.ndim(var.val) == 0 else None


def _gather_read(eqn, n, producers, args, tile) -> Read:
    """A ``gather`` of array ``n``: a view, a point read, or a general (pointer) gather."""
    operand, indices = eqn.invars
    dn = eqn.params["dimension_numbers"]
    ndim = _rank(operand)
    out = tuple(eqn.outvars[0].aval.shape)
    point = (
        dn.offset_dims == () and tuple(sorted(dn.collapsed_slice_dims)) == tuple(range(ndim))
        and sorted(dn.start_index_map) == list(range(ndim)) and not dn.operand_batching_dims
        and all(s == 1 for s in eqn.params["slice_sizes"])
    )  # fmt: skip
    if not point:
        return Read("whole", n)
    prod = producers.get(_var(indices))
    if ndim == 1:
        pieces = [indices]
    elif prod is not None and prod.primitive.name == "concatenate" and len(prod.invars) == ndim:
        pieces = list(prod.invars)
    else:
        return Read("whole", n)
    index = [None] * ndim
    for axis, piece in zip(dn.start_index_map, pieces, strict=True):
        tag, var = _source(piece, producers, args, tile) or ("vector", piece)
        size = operand.aval.shape[axis]
        const = 0 if size == 1 else _constant(piece, producers)
        index[axis] = ("static", min(max(const, 0), size - 1)) if const is not None else (
            tag, piece if tag in ("q", "k") else var)  # fmt: skip
    tags = [t for t, _ in index]
    sides = [t for t in tags if t in ("q", "k")]
    kind = "gather" if "vector" in tags or len(sides) > 1 else "view" if sides else "point"
    deps = tuple(_deps(v, producers, args) if t in ("vector", "scalar") else frozenset({t})
                 & set(_ARGS) for t, v in index)  # fmt: skip
    return Read(kind, n, tuple(index), out=out, deps=deps)


def _deps(var, producers, args) -> frozenset:
    """The mod's arguments (``"b"``, ``"h"``, ``"q"``, ``"k"``) an index is computed from
    (closed-over values are constants); ``"?"`` for a value of unknown source (an inner
    call's argument)."""
    seen, todo, out = set(), [var], set()
    while todo:
        v = todo.pop()
        if isinstance(v, jcore.Literal) or v in seen:
            continue
        seen.add(v)
        if v in args:
            out |= {args[v]} - {"const"}
        elif v in producers:
            todo.extend(producers[v].invars)
        else:
            out.add("?")
    return frozenset(out)


def classify(eqn, markers: dict, producers: dict, args: dict, tile) -> dict[int, Read]:
    """The reads an equation makes of closed-over arrays, by operand position."""
    name = eqn.primitive.name
    marked = {i: markers[v] for i, v in enumerate(eqn.invars) if _var(v) in markers}
    out = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
    if name == "gather" and list(marked) == [0]:
        return {0: _gather_read(eqn, marked[0], producers, args, tile)}
    if name == "dynamic_slice" and list(marked) == [0]:
        starts = tuple(("scalar", v) for v in eqn.invars[1:])
        sizes = tuple(eqn.params["slice_sizes"])
        kind = "point" if all(s == 1 for s in sizes) else "slice"
        deps = tuple(_deps(v, producers, args) for v in eqn.invars[1:])
        return {0: Read(kind, marked[0], starts, sizes, out, deps)}
    if name == "slice" and list(marked) == [0] and eqn.params.get("strides") in (None, (1,) * _rank(
            eqn.invars[0])):  # fmt: skip
        starts = tuple(("static", s) for s in eqn.params["start_indices"])
        sizes = tuple(b - a for a, b in zip(eqn.params["start_indices"],
                                            eqn.params["limit_indices"], strict=True))  # fmt: skip
        return {0: Read("slice", marked[0], starts, sizes, out)}
    return {i: Read("whole", n) for i, n in marked.items()}


# ---- one hoisted mod -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """How closed-over array ``n`` travels to a backend's kernels."""

    shape: tuple[int, ...]
    dtype: Any
    store: Any  # dtype of the kernel inputs
    whole: bool  # Triton: the array, view axis padded to ``pad``
    smem: bool  # Mosaic: a flat SMEM copy for point reads
    col: int | None  # Mosaic: the q-view axis (a ``[*lead, Tq_pad, 1]`` copy)
    row: int | None  # Mosaic: the k-view axis (a ``[*lead, 1, Tk_pad]`` copy)
    per_example: bool  # Mosaic views: axis 0 is the batch, read at ``b`` (one block per example)
    pad: int | None  # Triton: the view axis padded to this length
    grad: str | None  # None, "row", "partial", "atomic" or "tile" (see the module docstring)
    tile: Any = None  # Mosaic: a dense table read at [.., q_idx, .., kv_idx] (layouts.Table)


@dataclasses.dataclass(frozen=True, eq=False)
class Closure:
    """A mod hoisted for the kernels: its jaxpr, kept constants, the arrays it reads and how."""

    name: str
    jaxpr: Any
    consts: tuple[Any, ...]  # per constvar: a Marker (lifted array) or the value
    arrays: tuple[Any, ...]  # the lifted arrays (kernel inputs)
    reads: dict  # path -> Read (every read, nested calls included)
    layouts: tuple[Layout, ...]
    tile: tuple[int, int]
    out: Any  # jax.ShapeDtypeStruct of the mod's result
    example: tuple[Any, ...]  # its arguments' shapes and dtypes


def _lift(c) -> bool:
    return isinstance(c, jax.core.Tracer) or np.ndim(c) > 0


def reads_of(jaxpr, markers: dict, args: dict, tile, path=()) -> dict:
    """Every read of a marked array in ``jaxpr`` (and the calls it makes), keyed by path."""
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}
    found = {}
    for k, eqn in enumerate(jaxpr.eqns):
        if not any(_var(v) in markers for v in eqn.invars):
            continue
        param = CALLS.get(eqn.primitive.name)
        if param is not None:
            inner = eqn.params[param]
            inner_jaxpr = getattr(inner, "jaxpr", inner)
            inner_markers = {
                iv: markers[ov]
                for iv, ov in zip(inner_jaxpr.invars, eqn.invars, strict=True)
                if _var(ov) in markers
            }
            if any(_var(v) in inner_markers for v in inner_jaxpr.outvars):
                raise Unsupported("a mod returning a closed-over array itself")
            found |= reads_of(inner_jaxpr, inner_markers, {}, tile, (*path, k))
            continue
        if eqn.primitive.name in ("cond", "while", "scan"):
            raise Unsupported(f"a mod reading a closed-over array inside {eqn.primitive.name}")
        for pos, read in classify(eqn, markers, producers, args, tile).items():
            found[(*path, k, pos)] = read
    return found


def hoist(name: str, mod: Any, example: tuple[Any, ...]) -> Closure | None:
    """Hoist ``mod`` at the kernel's tile (``example``: its arguments) and classify its reads."""
    if mod is None:
        return None
    h = _bm.hoist(name, mod, *example)
    jaxpr, consts = h.closed.jaxpr, list(h.closed.consts)
    lifted = [i for i, c in enumerate(consts) if _lift(c)]
    markers = {jaxpr.constvars[i]: Marker(n) for n, i in enumerate(lifted)}
    kept = tuple(markers[v] if v in markers else np.asarray(c) if np.ndim(c) == 0 else c
                 for v, c in zip(jaxpr.constvars, consts, strict=True))  # fmt: skip
    nargs = len(jaxpr.invars)
    args = {v: "const" for v in jaxpr.constvars}
    args |= dict(zip(jaxpr.invars[nargs - 4 :], _ARGS, strict=True))
    tile = tuple(example[-1].shape)
    reads = reads_of(jaxpr, {v: m.n for v, m in markers.items()}, args, tile)
    arrays = tuple(consts[i] for i in lifted)
    example = tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in example)
    return Closure(name, jaxpr, kept, arrays, reads, (), tile, h.out, example)


def selects(r: Read, shape) -> int:
    """Entries a gather from a small SMEM table selects among (its gathered axes' sizes)."""
    return math.prod(shape[a] for a, (tag, _) in enumerate(r.index) if tag in GATHERED)
