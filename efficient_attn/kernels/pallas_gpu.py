"""The fused kernels on NVIDIA GPUs through Triton (Pallas' GPU backend).

Layout ``[B, T, heads, H]`` as given (no transposes): a program's query tile is a
``[bq, H]`` block, its K/V head's whole key row a ``[Tk_pad, H]`` block (Triton
loads only the tiles the lists name), chosen by the index maps (GQA:
``h // G``; K/V are never repeated). Grids: forward and dQ over
``(nq, B, N)``, dK/dV over ``(nk, B, K)``. Head dims are padded to a power of
two (at least 16) by the caller: Triton's shapes must be powers of two. The
mods' arrays are whole-array blocks that the kernel indexes itself (pointer
gathers where a mod gathers).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efficient_attn.kernels import bodies, common
from efficient_attn.kernels.config import TileConfig

#: Layout of the arrays this backend takes: queries/keys ``[B, T, heads, H]``.
HEADS_FIRST = False
#: Smallest tile and head dim (``tl.dot`` needs 16).
MIN_TILE = 16


def _ids():
    return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * len(x.shape))


def block_spec(block: common.Block, shape) -> pl.BlockSpec:
    """A :class:`~efficient_attn.kernels.common.Block` on this backend's grid ``(t, b, hh)``."""
    if block.shape is None:
        return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))
    return pl.BlockSpec(block.shape, block.index)


def _call(kernel, spec, cfg, interpret, name, grid, scalars, in_specs, args, out_specs, out_shape,
          head_dim, extra_in=(), extra_out=(), aliases=None):  # fmt: skip
    n_in, n_out = len(scalars) + len(args), len(out_specs)
    io = {n_in + i: n_out + o for i, o in (aliases or {}).items()}  # extras: input -> output
    in_specs = [_whole(x) for x in scalars] + in_specs + [block_spec(b, x.shape)
                                                          for x, b in extra_in]  # fmt: skip
    out_specs = list(out_specs) + [block_spec(b, s.shape) for s, b in extra_out]
    out_shape = list(out_shape) + [s for s, _ in extra_out]
    return pl.pallas_call(
        functools.partial(kernel, spec, _ids),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=io,
        compiler_params=plgpu.CompilerParams(
            num_warps=cfg.warps(head_dim), num_stages=cfg.num_stages
        ),
        interpret=interpret,
        name=name,
    )(*scalars, *args, *(x for x, _ in extra_in))


def _query_tile_specs(spec, q, k, v):
    """A program's query tile ``[bq, H]`` and its K/V head's key rows ``[Tk_pad, H|Hv]``."""
    h, tk, hv, g = q.shape[-1], k.shape[1], v.shape[-1], spec.groups
    return [
        pl.BlockSpec((None, spec.bq, None, h), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, tk, None, h), lambda i, b, n: (b, 0, jax.lax.div(n, g), 0)),
        pl.BlockSpec((None, tk, None, hv), lambda i, b, n: (b, 0, jax.lax.div(n, g), 0)),
    ]


def forward(spec: common.Spec, cfg: TileConfig, interpret: bool, scalars, q, k, v, extra_in):
    """q ``[B, Tq_pad, N, H]``, k/v ``[B, Tk_pad, K, H|Hv]`` -> (o ``[B, Tq_pad, N, Hv]``, lse).

    lse: ``[B, N, Tq_pad, 1]`` float32; ``extra_in``: ``(array, Block)`` pairs (bias, mods).
    """
    b, tq, n, h = q.shape
    hv, bq = v.shape[-1], spec.bq
    out_specs = [
        pl.BlockSpec((None, bq, None, hv), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, tq, n, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, tq, 1), jax.numpy.float32),
    ]
    return _call(bodies.forward_kernel, spec, cfg, interpret, "ea_flash_forward",
                 (tq // bq, b, n), scalars, _query_tile_specs(spec, q, k, v), (q, k, v), out_specs,
                 out_shape, h, extra_in)  # fmt: skip


def dkdv(spec, cfg, interpret, scalars, q, k, v, do, lse, delta, extra_in, extra_out, aliases):
    """dK, dV ``[B, Tk_pad, K, H|Hv]`` (then ``extra_out``) over the transposed lists (one
    program per key tile)."""
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
    ]
    out_specs = [
        pl.BlockSpec((None, bk, None, h), lambda j, b, c: (b, j, c, 0)),
        pl.BlockSpec((None, bk, None, hv), lambda j, b, c: (b, j, c, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _call(bodies.dkdv_kernel, spec, cfg, interpret, "ea_flash_dkdv", (tk // bk, b, kh),
                 scalars, in_specs, (k, v, q, do, lse, delta), out_specs, out_shape, h, extra_in,
                 extra_out, aliases)  # fmt: skip


def dq(spec, cfg, interpret, scalars, q, k, v, do, lse, delta, extra_in, extra_out):
    """dQ ``[B, Tq_pad, N, H]`` (then ``extra_out``) over the forward lists (one program per
    query tile)."""
    b, tq, n, h = q.shape
    hv, bq = v.shape[-1], spec.bq
    in_specs = [
        *_query_tile_specs(spec, q, k, v),
        pl.BlockSpec((None, bq, None, hv), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0)),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, h), lambda i, b, n: (b, i, n, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    return _call(bodies.dq_kernel, spec, cfg, interpret, "ea_flash_dq", (tq // bq, b, n),
                 scalars, in_specs, (q, k, v, do, lse, delta), out_specs, out_shape, h, extra_in,
                 extra_out)  # fmt: skip
