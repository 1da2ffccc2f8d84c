"""The kernels' inputs and outputs beyond q, k, v: the dense bias, the mods' arrays and
the gradient buffers, each with its :class:`~efficient_attn.kernels.common.Block`.

Programs are ``(t, b, hh)``: query tile, example, query head (forward, dQ) or key
tile, example, K/V head (dK/dV). Gradient buffers are written per program and summed
here (:func:`bias_grad`, :func:`array_grads`), so the backward stays deterministic
(except Triton's atomic buffers, see :mod:`efficient_attn.kernels.closures`).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from efficient_attn.kernels import closures as cl
from efficient_attn.kernels import layouts
from efficient_attn.kernels.common import Block, roles


def _p2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def _pad(x, axis: int, size: int):
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _zeros(ndim: int):
    return lambda *_: (0,) * ndim


def _program(t, b, hh, *, rank: int):
    """Block index of a per-program buffer ``[nt, B, heads, ...]``."""
    return (t, b, hh, *(0,) * rank)


def _key_rows(t, b, hh, *, rank: int):
    """Block index of a per-program row buffer ``[B, heads, *lead, 1, Tk_pad]``."""
    return (b, hh, *(0,) * rank, 0, t)


def _example(t, b, hh, *, rank: int):
    """Block index of example ``b`` of an array ``[B, ...]``."""
    return (b, *(0,) * rank)


def whole(x) -> Block:
    """The whole array ``x`` for every program."""
    return Block(None, _zeros(x.ndim))


# ---- the dense bias --------------------------------------------------------------------


def bias_input(p, bias):
    """The rank-4 bias padded to the tiles: ``[B|1, N|1, Tq_pad|1, Tk_pad|1]``."""
    vary = p.spec.bias
    bias = _pad(bias, 2, p.tq_pad) if vary[2] else bias
    bias = _pad(bias, 3, p.tk_pad) if vary[3] else bias
    if p.backend == "tpu" and (not vary[2] or not vary[3]) and bias.dtype.itemsize < 4:
        bias = bias.astype(jnp.float32)  # Mosaic: 16-bit blocks with a unit dim: widen
    return bias


def bias_block(p, kernel: str, vary=None) -> Block:
    """The bias block of a program: ``[bq|1, Tk_pad|1]`` (forward, dQ) or
    ``[G|1, Tq_pad|1, bk|1]`` (dK/dV); ``vary``: another array in the bias's layout
    (a :class:`~efficient_attn.kernels.layouts.Table`'s)."""
    sp = p.spec
    vb, vn, vq, vk = vary or sp.bias
    tk_b, tq_b = p.tk_pad if vk else 1, p.tq_pad if vq else 1
    if kernel == "dkdv":
        g = sp.groups if vn else 1
        index = lambda t, b, hh: (b if vb else 0, hh if vn else 0, 0, t if vk else 0)  # noqa: E731
        return Block((None, g, tq_b, sp.bk if vk else 1), index)
    index = lambda t, b, hh: (b if vb else 0, hh if vn else 0, t if vq else 0, 0)  # noqa: E731
    return Block((None, None, sp.bq if vq else 1, tk_b), index)


def bias_grad_output(p, vary=None):
    """``(shape, Block, kernel)`` of the bias gradient buffer (``vary``: of another array in
    the bias's layout, always from the dK/dV kernel)."""
    sp = p.spec
    if vary is not None or sp.bias_dkdv:
        vary = vary or sp.bias
        gb = sp.groups if vary[1] else 1
        tq_b = p.tq_pad if vary[2] else 1
        shape = (p.batch, p.kv_heads, gb, tq_b, p.tk_pad)
        block = Block((None, None, gb, tq_b, sp.bk), lambda t, b, hh: (b, hh, 0, 0, t))
        return shape, block, "dkdv"
    return (*row_sums(p), "dq")


def row_sums(p):
    """``(shape, Block)`` of a dQ kernel's per-row buffer ``[B, N, Tq_pad, 1]``."""
    shape = (p.batch, p.heads, p.tq_pad, 1)
    return shape, Block((None, None, p.spec.bq, 1), lambda t, b, hh: (b, hh, t, 0))


def bias_grad(p, buf, bias_shape, dtype, vary=None):
    """The bias gradient ``bias_shape`` (rank 4) from the kernel's buffer (``vary``: of
    another array in the bias's layout, from the dK/dV kernel)."""
    vb, vn, vq, _ = vary or p.spec.bias
    dkdv = vary is not None or p.spec.bias_dkdv
    g = buf.reshape(buf.shape[0], -1, *buf.shape[3:]) if dkdv else buf
    if not vn:
        g = g.sum(1, keepdims=True)
    if not vb:
        g = g.sum(0, keepdims=True)
    if not vq:
        g = g.sum(2, keepdims=True)
    if vary is not None and not vary[3]:  # a table constant along keys: column sums
        g = g.sum(3, keepdims=True)
    g = g[:, :, : bias_shape[2], : bias_shape[3]]
    return g.astype(dtype)


# ---- the mods' arrays ------------------------------------------------------------------


def _view_copy(x, axis: int, length: int, column: bool):
    """``x`` with ``axis`` last, padded or cut to ``length``: ``[.., T, 1]`` or ``[.., 1, T]``."""
    x = jnp.moveaxis(x, axis, -1)
    x = _pad(x, x.ndim - 1, length)[..., :length]
    return x[..., :, None] if column else x[..., None, :]


def mod_inputs(p, c: cl.Closure | None, arrays, kernel: str) -> tuple[list, list[Block]]:
    """A closure's arrays as ``kernel``'s inputs (:func:`~efficient_attn.kernels.common.roles`)."""
    xs, blocks = [], []
    for n, role in roles(c):
        lay = c.layouts[n]
        x = jnp.asarray(arrays[n]).astype(lay.store)
        if role == "tile":
            xs.append(layouts.table_input(p, c, arrays, n))
            if lay.tile.onehot is not None:  # whole, per example and head
                blocks.append(_onehot_block(p, kernel, lay.tile.vary, xs[-1].shape[2:]))
            else:
                blocks.append(bias_block(p, kernel, lay.tile.vary))
        elif role == "whole":
            x = x.reshape(1) if x.ndim == 0 else x
            if lay.pad is not None:
                axis = next(r.axis for r in c.reads.values() if r.array == n and r.kind == "view")
                x = _pad(x, axis, lay.pad)
            xs.append(x)
            blocks.append(Block(None, _zeros(x.ndim)))
        elif role == "smem":
            xs.append(x.reshape(-1))
            blocks.append(Block(None, _zeros(1), smem=True))
        else:
            column = role == "col"
            axis = lay.col if column else lay.row
            x = _view_copy(x, axis, p.tq_pad if column else p.tk_pad, column)
            xs.append(x)
            if lay.per_example:
                index = functools.partial(_example, rank=x.ndim - 1)
                blocks.append(Block((None, *x.shape[1:]), index))
            else:
                blocks.append(Block(None, _zeros(x.ndim)))
    return xs, blocks


def _onehot_block(p, kernel: str, vary, pad) -> Block:
    """A separable table's block: ``[rows, cols]`` of the program's example and head (of its
    K/V head's ``G`` query heads in dK/dV)."""
    vb, vn = vary[:2]
    index = lambda t, b, hh: (b if vb else 0, hh if vn else 0, 0, 0)  # noqa: E731
    g = (p.spec.groups if vn else 1) if kernel == "dkdv" else None
    return Block((None, g, *pad), index)


def grad_outputs(p, c: cl.Closure) -> tuple[list, list[Block], list, dict]:
    """The dK/dV kernel's gradient buffers of ``c``'s arrays: ``(shapes, blocks, zero inputs
    for the atomic ones, {output position: input position})`` (positions among the buffers)."""
    shapes, blocks, zeros, aliases = [], [], [], {}
    sp = p.spec
    for pos, n in enumerate(sp.grads_of_score()):
        lay = c.layouts[n]
        if lay.grad == "tile":
            shape, block, _ = bias_grad_output(p, lay.tile.vary)
            shapes.append(shape)
            blocks.append(block)
        elif lay.grad == "row":
            axis = next(r.axis for r in c.reads.values() if r.array == n and r.kind == "view")
            lead = [d for a, d in enumerate(lay.shape) if a != axis]
            lead = [_p2(d) for d in lead] if p.backend == "gpu" else lead
            shapes.append((p.batch, p.kv_heads, *lead, 1, p.tk_pad))
            index = functools.partial(_key_rows, rank=len(lead))
            blocks.append(Block((None, None, *lead, 1, sp.bk), index))
        elif lay.grad == "partial":
            inner = (1, math.prod(lay.shape)) if lay.smem else tuple(
                _p2(d) for d in lay.shape) or (1,)  # fmt: skip
            shapes.append((p.nk, p.batch, p.kv_heads, *inner))
            index = functools.partial(_program, rank=len(inner))
            blocks.append(Block((None, None, None, *inner), index, smem=lay.smem))
        else:
            shape = _stored_shape(c, n)
            aliases[pos] = len(zeros)
            zeros.append(jnp.zeros(shape, jnp.float32))
            shapes.append(shape)
            blocks.append(Block(None, _zeros(len(shape))))
    return shapes, blocks, zeros, aliases


def _stored_shape(c: cl.Closure, n: int) -> tuple[int, ...]:
    lay = c.layouts[n]
    shape = list(lay.shape) or [1]
    if lay.pad is not None:
        axis = next(r.axis for r in c.reads.values() if r.array == n and r.kind == "view")
        shape[axis] = max(shape[axis], lay.pad)
    return tuple(shape)


def array_grads(p, c: cl.Closure, bufs, arrays) -> tuple:
    """The cotangents of ``c``'s arrays (None where none is computed) from the buffers."""
    out = [None] * len(arrays)
    for n, buf in zip(p.spec.grads_of_score(), bufs, strict=True):
        lay = c.layouts[n]
        if lay.grad == "tile":
            vb, vn, vq, vk = lay.tile.vary
            shape = (p.batch if vb else 1, p.heads if vn else 1, p.tq_pad if vq else 1,
                     p.tk_pad if vk else 1)  # fmt: skip
            g = bias_grad(p, buf, shape, jnp.float32, lay.tile.vary)
            g = layouts.table_grad(p, c, arrays, n, g)
        elif lay.grad == "row":
            axis = next(r.axis for r in c.reads.values() if r.array == n and r.kind == "view")
            g = buf.sum((0, 1))[..., 0, :]  # [*lead_p, Tk_pad]
            g = g[tuple(slice(0, d) for a, d in enumerate(lay.shape) if a != axis)]
            length = lay.shape[axis]
            g = _pad(g, g.ndim - 1, length)[..., :length]
            g = jnp.moveaxis(g, -1, axis)
        elif lay.grad == "partial":
            g = buf.sum((0, 1, 2))
            g = g.reshape(lay.shape) if lay.smem else g[tuple(slice(0, d) for d in lay.shape)]
        else:
            g = buf[tuple(slice(0, d) for d in lay.shape)] if lay.shape else buf[0]
        out[n] = g.reshape(lay.shape).astype(lay.dtype)
    return tuple(out)
