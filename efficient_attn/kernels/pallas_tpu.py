"""The fused kernels on TPU through Mosaic (Pallas' TPU backend).

Layout ``[B, heads, T, H]`` (the caller transposes): Mosaic tiles the last two
dims of a block, so a block is a ``[bq, H]`` slab of one head. The tile lists,
counts, ``kv_len`` and the dropout seed are scalar-prefetch inputs (SMEM); a
program's K/V head keeps its whole key row in VMEM (``[Tk_pad, H]``: 1 MiB per
operand at 4k tokens and head_dim 128 in bf16; raise ``vmem_limit_bytes`` in the
config for long rows). Grids: forward and dQ ``(B, N, nq)`` (K/V stay resident
while the query tiles of a head run), dK/dV ``(B, K, nk)``. The mods' arrays
(Mosaic has no gather): views as a column ``[Tq_pad, 1]`` / row ``[1, Tk_pad]``
per example, arrays read at scalar indices in SMEM, small tables a mod gathers from in
SMEM too, read by one select per entry, larger ones (a dense mask ``m[b, h, q_idx,
kv_idx]``, BigBird's block table, a relative-position table) blocked like the bias or
read by one-hot products (:mod:`efficient_attn.kernels.layouts`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from efficient_attn.kernels import bodies, common
from efficient_attn.kernels.config import TileConfig

#: Layout of the arrays this backend takes: queries/keys ``[B, heads, T, H]``.
HEADS_FIRST = True
#: Smallest query tile (sublanes) and key tile (lanes of the score tile).
MIN_TILE = 8
MIN_KEY_TILE = 128


def _ids():
    return pl.program_id(2), pl.program_id(0), pl.program_id(1)


def block_spec(block: common.Block, shape) -> pl.BlockSpec:
    """A :class:`~efficient_attn.kernels.common.Block` on this backend's grid ``(b, hh, t)``."""
    if block.shape is None and block.smem:
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    if block.shape is None:
        return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))
    kw = {"memory_space": pltpu.SMEM} if block.smem else {}
    return pl.BlockSpec(block.shape, lambda b, hh, t, *_: block.index(t, b, hh), **kw)


def _call(kernel, spec, cfg, interpret, name, grid, scalars, in_specs, args, out_specs, out_shape,
          extra_in=(), extra_out=()):  # fmt: skip
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=grid,
        in_specs=list(in_specs) + [block_spec(b, x.shape) for x, b in extra_in],
        out_specs=list(out_specs) + [block_spec(b, s.shape) for s, b in extra_out],
    )
    return pl.pallas_call(
        functools.partial(kernel, spec, _ids),
        grid_spec=grid_spec,
        out_shape=list(out_shape) + [s for s, _ in extra_out],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"),
            vmem_limit_bytes=cfg.vmem_limit_bytes,
        ),
        interpret=interpret,
        name=name,
    )(*scalars, *args, *(x for x, _ in extra_in))


def _query_tile_specs(spec, q, k, v):
    """A program's query tile ``[bq, H]`` and its K/V head's key rows ``[Tk_pad, H|Hv]``."""
    h, tk, hv, g = q.shape[-1], k.shape[2], v.shape[-1], spec.groups
    return [
        pl.BlockSpec((None, None, spec.bq, h), lambda b, n, i, *_: (b, n, i, 0)),
        pl.BlockSpec((None, None, tk, h), lambda b, n, i, *_: (b, jax.lax.div(n, g), 0, 0)),
        pl.BlockSpec((None, None, tk, hv), lambda b, n, i, *_: (b, jax.lax.div(n, g), 0, 0)),
    ]


def forward(spec: common.Spec, cfg: TileConfig, interpret: bool, scalars, q, k, v, extra_in):
    """q ``[B, N, Tq_pad, H]``, k/v ``[B, K, Tk_pad, H|Hv]`` -> (o, lse ``[B, N, Tq_pad, 1]``)."""
    b, n, tq, _ = q.shape
    hv, bq = v.shape[-1], spec.bq
    out_specs = [
        pl.BlockSpec((None, None, bq, hv), lambda b, n, i, *_: (b, n, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b, n, i, *_: (b, n, i, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, n, tq, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, tq, 1), jnp.float32),
    ]
    return _call(bodies.forward_kernel, spec, cfg, interpret, "ea_flash_forward",
                 (b, n, tq // bq), scalars, _query_tile_specs(spec, q, k, v), (q, k, v), out_specs,
                 out_shape, extra_in)  # fmt: skip


def dkdv(spec, cfg, interpret, scalars, q, k, v, do, lse, delta, extra_in, extra_out, aliases):
    """dK, dV ``[B, K, Tk_pad, H|Hv]`` (then ``extra_out``) over the transposed lists (one
    program per key tile)."""
    if aliases:
        raise ValueError("atomic gradient buffers are Triton's")
    b, _n, tq, h = q.shape
    kh, tk, hv = k.shape[1], k.shape[2], v.shape[-1]
    g, bk = spec.groups, spec.bk
    in_specs = [
        pl.BlockSpec((None, None, bk, h), lambda b, c, j, *_: (b, c, j, 0)),
        pl.BlockSpec((None, None, bk, hv), lambda b, c, j, *_: (b, c, j, 0)),
        pl.BlockSpec((None, g, tq, h), lambda b, c, j, *_: (b, c, 0, 0)),
        pl.BlockSpec((None, g, tq, hv), lambda b, c, j, *_: (b, c, 0, 0)),
        pl.BlockSpec((None, g, tq, 1), lambda b, c, j, *_: (b, c, 0, 0)),
        pl.BlockSpec((None, g, tq, 1), lambda b, c, j, *_: (b, c, 0, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, bk, h), lambda b, c, j, *_: (b, c, j, 0)),
        pl.BlockSpec((None, None, bk, hv), lambda b, c, j, *_: (b, c, j, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _call(bodies.dkdv_kernel, spec, cfg, interpret, "ea_flash_dkdv", (b, kh, tk // bk),
                 scalars, in_specs, (k, v, q, do, lse, delta), out_specs, out_shape, extra_in,
                 extra_out)  # fmt: skip


def dq(spec, cfg, interpret, scalars, q, k, v, do, lse, delta, extra_in, extra_out):
    """dQ ``[B, N, Tq_pad, H]`` (then ``extra_out``) over the forward lists (one program per
    query tile)."""
    b, n, tq, h = q.shape
    hv, bq = v.shape[-1], spec.bq
    in_specs = [
        *_query_tile_specs(spec, q, k, v),
        pl.BlockSpec((None, None, bq, hv), lambda b, n, i, *_: (b, n, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b, n, i, *_: (b, n, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b, n, i, *_: (b, n, i, 0)),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, h), lambda b, n, i, *_: (b, n, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    return _call(bodies.dq_kernel, spec, cfg, interpret, "ea_flash_dq", (b, n, tq // bq),
                 scalars, in_specs, (q, k, v, do, lse, delta), out_specs, out_shape, extra_in,
                 extra_out)  # fmt: skip
