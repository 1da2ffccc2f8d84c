"""Per-(b, h) tile lists in the XLA engine: one tile loop per group of the block mask.

A block mask that differs per example (``Bm = B``) or per query head (``Hm = N``)
runs the engine's loops (:mod:`.forward`, :mod:`.backward`) once per group
``(b mod Bm, h mod Hm)``, one group after the other (``lax.scan``), each on its own
slice of the batch and heads and over its own tile lists: an example visits only
its own tiles, and its full tiles run unmasked, where the union over the batch
and heads visits a tile any of them sees and masks it unless it is full for all.
(A ``vmap`` over the groups would run every group for as many steps as the
longest list: no fewer tiles than the union.) Shared masks ``(1, 1)`` never come
here: their loops are the engine's own; nor static masks whose groups would save
little (:func:`own_lists`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import blockmask as _bm
from efficient_attn.core import masking
from efficient_attn.core.engine.backward import _backward
from efficient_attn.core.engine.forward import _forward
from efficient_attn.core.engine.tiling import _Static


class _Groups:
    """Slices of a group ``(bb, hh)``: its examples (all when ``Bm = 1``) and its query head
    and that head's K/V head (all when ``Hm = 1``) of ``[B, T, heads, ...]`` arrays."""

    def __init__(self, groups: tuple[int, int], b: int, n: int, kh: int):
        self.bm, self.hm = groups
        if self.bm not in (1, b) or self.hm not in (1, n):
            raise ValueError(f"tile lists for (batch, heads)={groups}; the call has ({b}, {n})")
        self.b, self.n, self.g = b, n, n // kh

    def ids(self):
        g = jnp.arange(self.bm * self.hm, dtype=jnp.int32)
        return jax.lax.div(g, self.hm), jax.lax.rem(g, self.hm)

    def offset(self, bb, hh):
        return (bb if self.bm > 1 else 0, hh if self.hm > 1 else 0)

    def cut(self, x, bb, hh, heads: str | None = "q", b_axis: int = 0, h_axis: int = 2):
        """``x``'s slice of the group (an axis of size 1 is shared: kept whole)."""
        if x is None:
            return None
        if self.bm > 1 and x.shape[b_axis] > 1:
            x = jax.lax.dynamic_slice_in_dim(x, bb, 1, b_axis)
        if heads is not None and self.hm > 1 and x.shape[h_axis] > 1:
            h = hh if heads == "q" else jax.lax.div(hh, self.g)
            x = jax.lax.dynamic_slice_in_dim(x, h, 1, h_axis)
        return x

    def add(self, total, part, bb, hh, heads: str = "q", h_axis: int = 2):
        """``total`` with the group's slice plus ``part`` (accumulated in ``total``'s dtype)."""
        if total is None:
            return None
        start = [jnp.zeros((), jnp.int32)] * total.ndim
        if self.bm > 1 and total.shape[0] > 1:
            start[0] = bb
        if self.hm > 1 and total.shape[h_axis] > 1:
            start[h_axis] = hh if heads == "q" else jax.lax.div(hh, self.g)
        cur = jax.lax.dynamic_slice(total, start, part.shape)
        return jax.lax.dynamic_update_slice(total, cur + part.astype(total.dtype), start)

    def join(self, x):
        """Per-group results ``[Bm * Hm, B', T, N', *tail]`` -> ``[B, T, N, *tail]``."""
        _, b1, t, n1 = x.shape[:4]
        rest = x.shape[4:]
        x = x.reshape(self.bm, self.hm, b1, t, n1, *rest)
        x = jnp.moveaxis(x, 1, 3)  # [Bm, B', T, Hm, N', ...]
        return x.reshape(self.bm * b1, t, self.hm * n1, *rest)

    def lists(self, lists):
        """Lists ``[Bm, Hm, R(, W)]`` -> ``[Bm * Hm, R(, W)]`` (scan's leading axis)."""
        return tuple(x.reshape(self.bm * self.hm, *x.shape[2:]) for x in lists)


def grouped_forward(st: _Static, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos,
                    lists, mask_consts, bias, seed):  # fmt: skip
    """:func:`.forward._forward` per group: ``(out [B, Tq, N, Hv], lse [B, Tq, N])``.

    ``lists``: the block mask's eight per-(b, h) lists, ``[Bm, Hm, R(, W)]`` each.
    """
    gr = _Groups(st.groups, q.shape[0], q.shape[2], k.shape[2])

    def one(_, xs):
        bb, hh, *own = xs
        qg = gr.cut(q, bb, hh)
        kg, vg = gr.cut(k, bb, hh, "kv"), gr.cut(v, bb, hh, "kv")
        out = _forward(st, qg, kg, vg, scale, params, score_consts, gr.cut(kv_len, bb, hh, None),
                       q_pos, k_pos, tuple(own), mask_consts, gr.cut(bias, bb, hh, h_axis=1),
                       seed, gr.offset(bb, hh))  # fmt: skip
        return None, out

    _, (out, lse) = jax.lax.scan(one, None, (*gr.ids(), *gr.lists(lists[:4])))
    return gr.join(out), gr.join(lse)


def grouped_backward(st: _Static, res, cotangents):
    """:func:`.backward._backward` per group: the same cotangents, summed over the groups
    where they share an input (a K/V head of several query heads, the scale, the params,
    the ``score_mod``'s arrays, a bias broadcast over the groups)."""
    (q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts, bias, seed,
     out, lse) = res  # fmt: skip
    dout, dlse = cotangents
    gr = _Groups(st.groups, q.shape[0], q.shape[2], k.shape[2])
    acc = masking.stat_dtype(q.dtype)

    def one(carry, xs):
        dk, dv, dscale, dparams, dconsts, dbias = carry
        bb, hh, *own = xs
        cut = lambda x: gr.cut(x, bb, hh)  # noqa: E731
        res_g = (cut(q), gr.cut(k, bb, hh, "kv"), gr.cut(v, bb, hh, "kv"), scale, params,
                 score_consts, gr.cut(kv_len, bb, hh, None), q_pos, k_pos, (None,) * 4 + tuple(own),
                 mask_consts, gr.cut(bias, bb, hh, h_axis=1), seed, cut(out), cut(lse))  # fmt: skip
        grads = _backward(st, res_g, (cut(dout), cut(dlse)), gr.offset(bb, hh))
        dq_g, dk_g, dv_g, dscale_g, dparams_g, dconsts_g = grads[:6]
        dk, dv = gr.add(dk, dk_g, bb, hh, "kv"), gr.add(dv, dv_g, bb, hh, "kv")
        dbias = gr.add(dbias, grads[-2], bb, hh, h_axis=1)
        dparams = jax.tree.map(jnp.add, dparams, dparams_g)
        dconsts = tuple(None if a is None else a + g for a, g in zip(dconsts, dconsts_g,
                                                                     strict=True))  # fmt: skip
        return (dk, dv, dscale + dscale_g, dparams, dconsts, dbias), dq_g

    def zeros(x, dtype=None):
        return None if x is None else jnp.zeros(jnp.shape(x), dtype or jnp.result_type(x))

    float_consts = [jnp.issubdtype(jnp.result_type(c), jnp.floating) for c in score_consts]
    init = (zeros(k, acc), zeros(v, acc), zeros(scale), jax.tree.map(zeros, params),
            tuple(zeros(c) if f else None for c, f in zip(score_consts, float_consts,
                                                          strict=True)),
            None if bias is None else zeros(bias, acc))  # fmt: skip
    carry, dq = jax.lax.scan(one, init, (*gr.ids(), *gr.lists(lists[4:])))
    dk, dv, dscale, dparams, dconsts, dbias = carry
    nones = jax.tree.map(lambda _: None, (kv_len, q_pos, k_pos, lists, mask_consts))
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return (gr.join(dq), dk.astype(k.dtype), dv.astype(v.dtype), dscale, dparams, dconsts,
            *nones, dbias, None)  # fmt: skip


def own_lists(bm: _bm.BlockMask) -> bool:
    """Whether the engine runs ``bm``'s per-(b, h) lists (one loop per group) or their union.

    Shared masks: the union (their one list). A mask classified on device (data): its own
    lists. A static mask: its own lists when a group's mean cost (tiles visited, a partial
    one counted twice: it evaluates the mask) is under 0.9 of the union's: otherwise the
    union costs the same work in fewer, larger steps.
    """
    if tuple(bm.tiles.shape[:2]) == (1, 1):
        return False
    if not bm.static:
        return True
    t = np.asarray(bm.tiles)
    seen, full = t != _bm.EMPTY, t == _bm.FULL
    own = (2 * seen.sum((2, 3)) - full.sum((2, 3))).mean()
    union_seen = seen.any((0, 1))
    union = 2 * union_seen.sum() - (union_seen & full.all((0, 1))).sum()
    return bool(own < 0.9 * union)


def run_forward(st: _Static, *args):
    """The engine's forward: the shared loops, or one per group of a per-(b, h) block mask."""
    return _forward(st, *args) if st.groups == (1, 1) else grouped_forward(st, *args)


def run_backward(st: _Static, res, cotangents):
    """The engine's backward: the shared loops, or one per group of a per-(b, h) block mask."""
    if st.bwd is not None:  # its own tiles (shared lists only): see tiled._prepare
        return _backward(st.bwd, res, cotangents)
    return _backward(st, res, cotangents) if st.groups == (1, 1) else grouped_backward(
        st, res, cotangents)  # fmt: skip
