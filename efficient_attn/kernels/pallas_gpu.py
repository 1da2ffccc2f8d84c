"""The fused kernels on NVIDIA GPUs through Pallas' Triton backend (also run in interpret mode).

Layout ``[B, T, N, H]`` as given (no transposes): a program's query tile is a
``[bq, H]`` block, its K/V head's whole key row a ``[Tk_pad, H]`` block (Triton
loads only the tiles the lists name), chosen by the index maps (GQA:
``h // G``; K/V are never repeated). Grids: forward and dQ over
``(nq, B, N)``, dK/dV over ``(nk, B, K)``. Head dims are padded to a power of
two (at least 16) by the caller: Triton's shapes must be powers of two.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efficient_attn.kernels import common
from efficient_attn.kernels.config import TileConfig

#: Layout of the arrays this backend takes: queries/keys ``[B, T, heads, H]``.
HEADS_FIRST = False
#: Smallest tile and head dim (``tl.dot`` needs 16).
MIN_TILE = 16


def _ids():
    return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _call(kernel, spec, cfg, interpret, name, grid, scalars, in_specs, args, out_specs, out_shape,
          head_dim):  # fmt: skip
    return pl.pallas_call(
        functools.partial(kernel, spec, _ids),
        grid=grid,
        in_specs=[_whole(x) for x in scalars] + in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=cfg.warps(head_dim), num_stages=cfg.num_stages
        ),
        interpret=interpret,
        name=name,
    )(*scalars, *args)


def _leaf_specs(spec: common.Spec, leaves):
    """Mask arrays read through views: this example's column/row; other mod arrays: whole."""
    n = 0 if spec.views is None else 2 * len(spec.views)
    per_example = [pl.BlockSpec((None, *x.shape[1:]), lambda _, b, __: (b, 0, 0))
                   for x in leaves[:n]]  # fmt: skip
    return [*per_example, *(_whole(x) for x in leaves[n:])]


def _query_tile_specs(spec, q, k, v):
    """A program's query tile ``[bq, H]`` and its K/V head's key rows ``[Tk_pad, H|Hv]``."""
    h, tk, hv, g = q.shape[-1], k.shape[1], v.shape[-1], spec.groups
    return [
        pl.BlockSpec((None, spec.bq, None, h), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, tk, None, h), lambda i, b, n: (b, 0, jax.lax.div(n, g), 0)),
        pl.BlockSpec((None, tk, None, hv), lambda i, b, n: (b, 0, jax.lax.div(n, g), 0)),
    ]


def forward(spec: common.Spec, cfg: TileConfig, interpret: bool, scalars, q, k, v, leaves):
    """q ``[B, Tq_pad, N, H]``, k/v ``[B, Tk_pad, K, H|Hv]`` -> (o ``[B, Tq_pad, N, Hv]``, lse).

    lse: ``[B, N, Tq_pad, 1]`` float32.
    """
    b, tq, n, h = q.shape
    hv, bq = v.shape[-1], spec.bq
    in_specs = [*_query_tile_specs(spec, q, k, v), *_leaf_specs(spec, leaves)]
    out_specs = [
        pl.BlockSpec((None, bq, None, hv), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, tq, n, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, tq, 1), jax.numpy.float32),
    ]
    return _call(common.forward_kernel, spec, cfg, interpret, "ea_flash_forward",
                 (tq // bq, b, n), scalars, in_specs, (q, k, v, *leaves), out_specs, out_shape,
                 h)  # fmt: skip


def dkdv(spec, cfg, interpret, scalars, q, k, v, do, lse, delta, leaves):
    """dK, dV ``[B, Tk_pad, K, H|Hv]`` over the transposed lists (one program per key tile)."""
    b, tq, _n, h = q.shape
    tk, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    g, bk = spec.groups, spec.bk
    in_specs = [
        pl.BlockSpec((None, bk, None, h), lambda j, b, c: (b, j, c, 0)),
        pl.BlockSpec((None, bk, None, hv), lambda j, b, c: (b, j, c, 0)),
        pl.BlockSpec((None, tq, g, h), lambda j, b, c: (b, 0, c, 0)),
        pl.BlockSpec((None, tq, g, hv), lambda j, b, c: (b, 0, c, 0)),
        pl.BlockSpec((None, g, tq, 1), lambda j, b, c: (b, c, 0, 0)),
        pl.BlockSpec((None, g, tq, 1), lambda j, b, c: (b, c, 0, 0)),
        *_leaf_specs(spec, leaves),
    ]
    out_specs = [
        pl.BlockSpec((None, bk, None, h), lambda j, b, c: (b, j, c, 0)),
        pl.BlockSpec((None, bk, None, hv), lambda j, b, c: (b, j, c, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _call(common.dkdv_kernel, spec, cfg, interpret, "ea_flash_dkdv", (tk // bk, b, kh),
                 scalars, in_specs, (k, v, q, do, lse, delta, *leaves), out_specs, out_shape,
                 h)  # fmt: skip


def dq(spec, cfg, interpret, scalars, q, k, v, do, lse, delta, leaves):
    """dQ ``[B, Tq_pad, N, H]`` over the forward lists (one program per query tile)."""
    b, tq, n, h = q.shape
    hv, bq = v.shape[-1], spec.bq
    in_specs = [
        *_query_tile_specs(spec, q, k, v),
        pl.BlockSpec((None, bq, None, hv), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
        *_leaf_specs(spec, leaves),
    ]
    out_specs = pl.BlockSpec((None, bq, None, h), lambda i, b, n: (b, i, n, 0))
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return _call(common.dq_kernel, spec, cfg, interpret, "ea_flash_dq", (tq // bq, b, n),
                 scalars, in_specs, (q, k, v, do, lse, delta, *leaves), out_specs, out_shape,
                 h)  # fmt: skip
