"""How a hoisted mod's arrays enter each backend's kernels: a :class:`~.closures.Layout` each.

Triton takes the array itself (loads and pointer gathers). Mosaic has no gather:
views travel as a column ``[Tq_pad, 1]`` / row ``[1, Tk_pad]`` copy, arrays read at
scalar indices and small tables in SMEM (:mod:`efficient_attn.kernels.closures`);
larger tables a mod gathers from become a :class:`Table`:

* dense, ``arr[.., q_idx, .., kv_idx]`` (other axes at ``b``, ``h`` or constants: a
  dense mask ``m[b, h, q_idx, kv_idx]``, the drop-in's boolean ``mask=``, a float table
  in a ``score_mod``): gathered once outside the kernels into the dense bias's layout
  ``[B|1, N|1, Tq_pad, Tk_pad]`` and blocked as the bias is
  (:func:`efficient_attn.kernels.extras.bias_block`): a query tile's row slab
  ``[bq, Tk_pad]`` (forward, dQ), a key tile's column slab ``[G|1, Tq_pad, bk]`` (dK/dV);
  its gradient a per-program column buffer like the bias's, summed outside and carried
  back to the array through the gather's VJP;
* separable, ``tab[f(q_idx), g(kv_idx)]`` (BigBird's block table) without a gradient:
  the whole table per example and head (padded to 128 x 128 multiples), read by one-hot
  products ``onehot(f) @ tab @ onehot(g)^T`` (exact: float32, HIGHEST precision);
* any other read (an array's only one) whose indices the mod computes from ``b``, ``h``
  and the positions (a relative-position table ``rel[h, kv_idx - q_idx + T]``, a
  separable table with a gradient, a large array read at scalar indices, a query view
  with a gradient): the read evaluated outside the kernels at every tile into the dense
  layout along what it depends on (at most :data:`EXPAND_LIMIT` elements), then read and
  differentiated as a dense table.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from efficient_attn.kernels.closures import (
    SELECT_LIMIT,
    SMEM_LIMIT,
    Closure,
    Layout,
    Marker,
    Read,
    Unsupported,
    selects,
)


def aligned(start, n: int):
    """``start`` (a multiple of ``n``), with that fact given to the compiler when traced."""
    return start if isinstance(start, int) else pl.multiple_of(start, n)


# ---- tables on Mosaic ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    """How Mosaic reads an array a mod gathers from (see the module): ``index`` per axis
    ``("q"|"k"|"b"|"h", None)`` or ``("static", value)`` (an expanded read's own index);
    ``vary``: its kernel input varies along ``(B, N, Tq, Tk)``, as ``Spec.bias``."""

    index: tuple
    vary: tuple[bool, bool, bool, bool]
    onehot: tuple[int, int] | None = None  # a separable table's (rows, columns): see onehot_of
    expand: tuple | None = None  # the key of a read expanded outside the kernel: expansion_of


def table_of(reads: list[Read], shape) -> Table | None:
    """A :class:`Table` if every read gathers ``[.., q_idx, .., kv_idx]`` at the same other
    indices (``b``, ``h``, constants), else None."""
    patterns = {tuple((t, v if t == "static" else None) for t, v in r.index) for r in reads}
    if not reads or any(r.kind != "gather" for r in reads) or len(patterns) != 1:
        return None
    index = patterns.pop()
    tags = [t for t, _ in index]
    if sorted(t for t in tags if t in ("q", "k")) != ["k", "q"] or not set(tags) <= {
            "q", "k", "b", "h", "static"}:  # fmt: skip
        return None
    vb, vn = (any(t == w and n > 1 for t, n in zip(tags, shape, strict=True)) for w in "bh")
    return Table(index, (vb, vn, True, True))


#: Mosaic's matmul operands: the one-hot products' table dims padded to multiples of this.
LANES = 128


def onehot_of(reads: list[Read], shape) -> Table | None:
    """A separable table ``tab[f(q_idx), g(kv_idx)]`` (BigBird's block table; other indices
    ``b``, ``h`` or constants, alike in every read), else None. The kernel reads it as
    ``onehot(f(q)) @ tab @ onehot(g(k))^T``: ``f`` and ``g`` are computed in the tile as the
    mod computes them, one row (column) of the tile each."""
    if not reads or any(r.kind != "gather" for r in reads):
        return None
    patterns = {tuple((t, v if t == "static" else None, d)
                      for (t, v), d in zip(r.index, r.deps, strict=True))
                for r in reads}  # fmt: skip
    if len(patterns) != 1:
        return None
    pattern = patterns.pop()
    index = []
    for tag, value, deps in pattern:
        if tag in ("q", "k", "vector"):
            side = deps - {"b", "h"}  # scalars in a tile
            if side not in ({"q"}, {"k"}):
                return None
            index.append((next(iter(side)), None))
        elif tag in ("b", "h", "static"):
            index.append((tag, value))
        else:
            return None
    tags = [t for t, _ in index]
    if sorted(t for t in tags if t in ("q", "k")) != ["k", "q"]:
        return None
    vb, vn = (any(t == w and n > 1 for t, n in zip(tags, shape, strict=True)) for w in "bh")
    sizes = tuple(shape[tags.index(s)] for s in ("q", "k"))
    return Table(tuple(index), (vb, vn, False, False), sizes)


def onehot_pad(t: Table) -> tuple[int, int]:
    """A separable table's padded ``(rows, columns)``."""
    return tuple(-(-n // LANES) * LANES for n in t.onehot)


def canonical(x, t: Table, batch: int, heads: int, t_pad, limits):
    """``x`` gathered into ``[B|1, N|1, Tq_pad, Tk_pad]``: position ``p`` holds what the tile
    reads there (positions clamped to the lengths, then to the array, as the kernels do)."""
    pos = {
        "b": jnp.arange(batch if t.vary[0] else 1).reshape(-1, 1, 1, 1),
        "h": jnp.arange(heads if t.vary[1] else 1).reshape(1, -1, 1, 1),
        "q": jnp.minimum(jnp.arange(t_pad[0]), limits[0] - 1).reshape(1, 1, -1, 1),
        "k": jnp.minimum(jnp.arange(t_pad[1]), limits[1] - 1).reshape(1, 1, 1, -1),
    }
    idx = tuple(v if tag == "static" else jnp.minimum(pos[tag], n - 1)
                for (tag, v), n in zip(t.index, x.shape, strict=True))  # fmt: skip
    out = jnp.asarray(x)[idx]
    return jnp.broadcast_to(out, (out.shape[0], out.shape[1], *t_pad))


#: Most elements a read is expanded to outside the kernels (:func:`expansion_of`).
EXPAND_LIMIT = 2**27


def expansion_of(c: Closure, key, read: Read, batch: int, heads: int, t_pad) -> Table | None:
    """Any other read whose indices the mod computes from ``b``, ``h`` and the positions
    alone (a relative-position table ``tab[h, q_idx - kv_idx + T]``; a large array read at
    scalar indices; a query view that needs its gradient), the array's only read, outside
    any inner call: expanded outside the kernels into the dense layout
    ``[B|1, N|1, Tq_pad|1, Tk_pad|1]`` (what it depends on), by evaluating the mod up to the
    read at every tile (None past :data:`EXPAND_LIMIT` elements)."""
    deps = set().union(*read.deps) if read.deps else {"?"}
    if len(key) != 2 or read.kind not in ("gather", "view", "point") or "?" in deps or (
            math.prod(read.out) not in (1, math.prod(c.tile))):  # fmt: skip
        return None
    vary = ("b" in deps and batch > 1, "h" in deps and heads > 1, "q" in deps, "k" in deps)
    size = [batch, heads, *t_pad]
    if math.prod(n for n, v in zip(size, vary, strict=True) if v) > EXPAND_LIMIT:
        return None
    return Table(read.index, vary, expand=key)


def _expand(c: Closure, arrays, t: Table, batch: int, heads: int, t_pad, limits):
    """An expanded read (:func:`expansion_of`) as ``[B|1, N|1, Tq_pad|1, Tk_pad|1]``."""
    k = t.expand[0]
    eqn = c.jaxpr.eqns[k]
    jaxpr = c.jaxpr.replace(eqns=c.jaxpr.eqns[: k + 1], outvars=[eqn.outvars[0]])
    consts = [arrays[m.n] if isinstance(m, Marker) else m for m in c.consts]
    (bq, bk), score = c.tile, len(c.jaxpr.invars) == 5

    def tile(b, h, i, j):
        iota = lambda d: jax.lax.broadcasted_iota(jnp.int32, (bq, bk), d)  # noqa: E731
        qi = jnp.minimum(i * bq + iota(0), limits[0] - 1)
        ki = jnp.minimum(j * bk + iota(1), limits[1] - 1)
        args = (b, h, qi, ki) if not score else (jnp.zeros((bq, bk), jnp.float32), b, h, qi, ki)
        x = jax.core.eval_jaxpr(jaxpr, consts, *args)[0]
        x = jnp.broadcast_to(x.reshape((bq, bk) if x.size > 1 else (1, 1)), (bq, bk))
        return x[: bq if t.vary[2] else 1, : bk if t.vary[3] else 1]

    for axis in range(4):  # over key tiles, query tiles, heads, examples
        tile = jax.vmap(tile, in_axes=tuple(0 if a == 3 - axis else None for a in range(4)))
    sizes = (batch, heads, t_pad[0] // bq, t_pad[1] // bk)
    n = [d if v else 1 for d, v in zip(sizes, t.vary, strict=True)]
    out = tile(*(jnp.arange(d, dtype=jnp.int32) for d in n))
    return out.transpose(0, 1, 2, 4, 3, 5).reshape(n[0], n[1], n[2] * out.shape[4],
                                                   n[3] * out.shape[5])  # fmt: skip


def table_input(p, c: Closure, arrays, n: int):
    """Array ``n`` of ``c`` (a :class:`Table`) in the dense layout, for the plan ``p``."""
    t, store = c.layouts[n].tile, c.layouts[n].store
    t_pad, limits = (p.tq_pad, p.tk_pad), (p.tq, p.tk)
    if t.expand is not None:
        return _expand(c, arrays, t, p.batch, p.heads, t_pad, limits).astype(store)
    x = jnp.asarray(arrays[n]).astype(store)
    if t.onehot is not None:
        return canonical(x, t, p.batch, p.heads, onehot_pad(t), t.onehot)
    return canonical(x, t, p.batch, p.heads, t_pad, limits)


def table_grad(p, c: Closure, arrays, n: int, g):
    """The cotangent of array ``n`` from that of its dense table ``g`` (:func:`table_input`)."""
    x = jnp.asarray(arrays[n], g.dtype)

    def dense(a):
        with_a = list(arrays)
        with_a[n] = a
        return table_input(p, c, with_a, n).astype(g.dtype)

    return jax.vjp(dense, x)[1](g)[0]


def row_slab_tile(spec, vary, ref, j):
    """Key tile ``j`` ``[bq|1, bk|1]`` of a query tile's slab ``[bq|1, Tk_pad|1]``."""
    return ref[:, pl.ds(aligned(j * spec.bk, spec.bk), spec.bk)] if vary[3] else ref[...]


def column_slab_tile(spec, vary, ref, g, i):
    """Query tile ``i`` ``[bq|1, bk|1]`` of group head ``g`` of a key tile's slab
    ``[G|1, Tq_pad|1, bk|1]``."""
    gg = g if vary[1] else 0
    return ref[gg, pl.ds(aligned(i * spec.bq, spec.bq), spec.bq), :] if vary[2] else ref[gg]


def add_to_column_slab(spec, vary, ref, g, i, ds) -> None:
    """Add a tile's ``ds`` to a key tile's column slab (summed over what it broadcasts)."""
    gg = g if vary[1] else 0
    if vary[2]:
        at = (gg, pl.ds(aligned(i * spec.bq, spec.bq), spec.bq), slice(None))
        ref[at] = ref[at] + ds
    else:
        ref[gg] = ref[gg] + jnp.sum(ds, axis=0, keepdims=True)


def onehot_tile(tile, t: Table, ref, fq, gk, exact: bool):
    """A separable table's ``[bq, bk]``: ``onehot(fq) @ tab @ onehot(gk)^T`` from the row
    indices ``fq [bq, 1]`` and column indices ``gk [1, bk]`` (clamped to the table)."""
    spec = tile.spec
    g = jax.lax.rem(tile.h, spec.groups) if t.vary[1] else 0
    tab = ref[g] if tile.dkdv else ref[...]
    rows, cols = tab.shape
    fq = jnp.clip(fq, 0, t.onehot[0] - 1)
    gk = jnp.clip(gk, 0, t.onehot[1] - 1)
    oq = (fq == jax.lax.broadcasted_iota(jnp.int32, (spec.bq, rows), 1)).astype(tab.dtype)
    ok = (jax.lax.broadcasted_iota(jnp.int32, (cols, spec.bk), 0) == gk).astype(tab.dtype)
    prec = jax.lax.Precision.HIGHEST if exact else None
    dot = lambda a, b: jax.lax.dot(a, b, precision=prec, preferred_element_type=tab.dtype)  # noqa: E731
    return dot(dot(oq, tab), ok)


def slab_tile(tile, vary, ref):
    """The tile's ``[bq, bk]`` of a table's slab, in the dK/dV kernel or another."""
    if tile.dkdv:
        return column_slab_tile(tile.spec, vary, ref, jax.lax.rem(tile.h, tile.spec.groups),
                                tile.i)  # fmt: skip
    return row_slab_tile(tile.spec, vary, ref, tile.j)


# ---- the layouts -------------------------------------------------------------------------


def plan_layouts(c: Closure, backend: str, batch: int, t_pad: tuple[int, int],
                 limits: tuple[int, int], grads: bool, heads: int = 1) -> Closure:  # fmt: skip
    """``c`` with a :class:`Layout` per array for ``backend``: ``t_pad`` the padded
    ``(Tq, Tk)``, ``limits`` the real ones; ``grads``: the arrays need gradients (a
    score_mod's traced float arrays); ``batch``, ``heads``: the call's. Raises
    :class:`Unsupported` for reads the backend cannot make."""
    reads = dict(c.reads)
    for key, r in reads.items():  # a view needs every position it reads inside the array
        if r.kind == "view":
            length = limits[0] if r.side == "q" else limits[1]
            if np.shape(c.arrays[r.array])[r.axis] < length:
                reads[key] = _as_gather(r)
    layouts = []
    for n, x in enumerate(c.arrays):
        mine = {k: r for k, r in reads.items() if r.array == n}
        kinds = {r.kind for r in mine.values()}
        shape, dtype = tuple(np.shape(x)), jnp.result_type(x)
        diff = grads and jnp.issubdtype(dtype, jnp.floating) and isinstance(x, jax.core.Tracer)
        if backend == "gpu":
            views = [r for r in mine.values() if r.kind == "view"]
            axes = {r.axis for r in views}
            if views and not (kinds <= {"view", "point", "gather"} and len(axes) == 1):
                reads.update({k: _as_gather(r) for k, r in mine.items() if r.kind == "view"})
                kinds = (kinds - {"view"}) | {"gather"}
                views = []
            layouts.append(_gpu_layout(shape, dtype, kinds, views, diff, t_pad))
        else:
            table = _table(shape, dtype, list(mine.values()), diff)
            if table is None and len(mine) == 1 and _expands(shape, *mine.values(), diff):
                ((key, read),) = mine.items()
                table = expansion_of(c, key, read, batch, heads, t_pad)
            if table is not None:
                kind = "tile" if table.onehot is None else "onehot"
                reads.update({k: dataclasses.replace(r, kind=kind) for k, r in mine.items()})
                store = _store(dtype if kind == "tile" or dtype == jnp.float64 else jnp.float32)
                if kind == "tile" and dtype == jnp.bool_ and all(table.vary[2:]) and (
                        c.tile[0] % 16 == 0):  # fmt: skip
                    store = jnp.bfloat16  # a dense mask: half an int32 slab (16-bit: 16 rows)
                layouts.append(Layout(shape, dtype, store, False, False, None, None, False, None,
                                      "tile" if diff else None, table))  # fmt: skip
                continue
            layouts.append(_tpu_layout(c.name, shape, dtype, list(mine.values()), diff, batch))
    return dataclasses.replace(c, reads=reads, layouts=tuple(layouts))


def _gpu_layout(shape, dtype, kinds, views, diff, t_pad) -> Layout:
    pad = None
    if views:
        axis = views[0].axis
        pad = max([t_pad[0] if r.side == "q" else t_pad[1] for r in views] + [shape[axis]])
    grad = None
    if diff:
        if kinds == {"view"} and all(r.side == "k" for r in views):
            grad = "row"
        elif kinds == {"point"}:
            grad = "partial"
        else:
            grad = "atomic"
    store = jnp.int32 if dtype == jnp.bool_ else dtype
    return Layout(shape, dtype, store, True, False, None, None, False, pad, grad)


def _as_gather(r: Read) -> Read:
    """A view read as a general gather (its positions as index arrays)."""
    return dataclasses.replace(r, kind="gather")


def _tpu_layout(name, shape, dtype, reads, diff, batch) -> Layout:
    what = f"{name}'s array of shape {shape}"
    kinds = {r.kind for r in reads}
    views = [r for r in reads if r.kind == "view"]
    axes = {r.axis for r in views}
    small = _small(shape, reads)
    if not kinds <= {"view", "point", "whole", "gather"} or ("whole" in kinds and math.prod(
            shape) != 1) or ("gather" in kinds and not small):  # fmt: skip
        raise Unsupported(
            f"on TPU {what} is read other than as arr[.., q_idx] / arr[.., kv_idx], at scalar "
            f"indices, as a table of at most {SELECT_LIMIT} entries along its gathered axes, "
            "as a dense table arr[.., q_idx, .., kv_idx] or a separable one arr[f(q_idx), "
            "g(kv_idx)] (other indices b, h or constants), or by a single read computed from "
            "b, h and the positions (Mosaic has no gather)"
        )
    if views and kinds != {"view"}:
        raise Unsupported(f"on TPU {what} is read both as a view and at scalar indices")
    if len(axes) > 1:
        raise Unsupported(f"on TPU {what} is read as views along several axes")
    smem = not views
    if smem and math.prod(shape) > SMEM_LIMIT:
        raise Unsupported(f"on TPU {what} read at scalar indices exceeds {SMEM_LIMIT} elements")
    axis = axes.pop() if views else None
    sides = {r.side for r in views}
    per_example = bool(views) and axis != 0 and shape[0] == batch and all(
        r.index[0][0] == "b" for r in views)  # fmt: skip
    grad = None
    if diff:
        if smem:
            grad = "partial"
        elif sides == {"k"}:
            grad = "row"
        else:
            raise Unsupported(f"on TPU the gradient of {what} read as a query view")
    return Layout(shape, dtype, _store(dtype), False, smem, axis if "q" in sides else None,
                  axis if "k" in sides else None, per_example, None, grad)  # fmt: skip


def _store(dtype):
    """Mosaic's dtype of an array's kernel input: 32-bit (float64 in interpret mode)."""
    if dtype == jnp.float64:
        return dtype
    return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else jnp.int32


def _small(shape, reads) -> bool:
    """Small enough for Mosaic's SMEM selects (one select per entry)."""
    return math.prod(shape) <= SMEM_LIMIT and all(
        selects(r, shape) <= SELECT_LIMIT for r in reads if r.kind == "gather")  # fmt: skip


def _expands(shape, read: Read, diff: bool) -> bool:
    """Whether Mosaic expands the array's one read (:func:`expansion_of`): a gather too large
    for the selects, a point read too large for SMEM, a query view with a gradient."""
    return (read.kind == "gather" and not _small(shape, [read])) or (
        read.kind == "point" and math.prod(shape) > SMEM_LIMIT) or (
        diff and read.kind == "view" and read.side == "q")  # fmt: skip


def _table(shape, dtype, reads, diff: bool) -> Table | None:
    """A dense or separable table of a mod on Mosaic (:func:`table_of`, :func:`onehot_of`;
    one with a gradient is expanded instead) too large for the SMEM selects."""
    if _small(shape, reads):
        return None
    exact = dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.floating)  # float32 one-hot products
    return table_of(reads, shape) or (onehot_of(reads, shape) if exact and not diff else None)
