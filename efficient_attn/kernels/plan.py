"""Whether the fused kernels can run a call, and everything static about it (:class:`Plan`).

:func:`plan` checks the tiles, head dims, VMEM rows (Mosaic) and the mods (hoisted
with the arrays they close over, :mod:`efficient_attn.kernels.closures`), and
raises :class:`~efficient_attn.kernels.common.Unsupported` with the reason when
the kernels cannot run the call.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from efficient_attn.core import blockmask as _bm
from efficient_attn.core import masking
from efficient_attn.core import mods as _mods
from efficient_attn.kernels import closures, common, evaluate, layouts, pallas_gpu, pallas_tpu
from efficient_attn.kernels.common import Unsupported
from efficient_attn.kernels.config import TileConfig, default_config

BACKENDS = {"gpu": pallas_gpu, "tpu": pallas_tpu}


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything static about one fused call (a nondiff argument of the custom_vjp)."""

    backend: str
    cfg: TileConfig
    interpret: bool
    spec: common.Spec
    bm: common.Split  # the block mask, its arrays passed explicitly
    batch: int
    heads: int
    kv_heads: int
    tq: int
    tk: int
    hv: int
    bwd: Plan | None = None  # the backward kernels' own tiles (a second block mask)

    @property
    def tq_pad(self) -> int:
        return masking.cdiv(self.tq, self.spec.bq) * self.spec.bq

    @property
    def tk_pad(self) -> int:
        return masking.cdiv(self.tk, self.spec.bk) * self.spec.bk

    @property
    def nk(self) -> int:
        return self.tk_pad // self.spec.bk


def _tile(block: int, count: int, minimum: int, what: str) -> tuple[int, bool]:
    """The kernel tile for a block mask tile: ``(size, overhangs)``."""
    if block >= minimum and block & (block - 1) == 0:
        return block, False
    if count == 1:  # one tile: round it up; the kernel bound-checks every tile
        return max(minimum, _next_pow2(block)), True
    raise Unsupported(
        f"block mask {what} tiles of {block} (the kernels need powers of two >= {minimum}; "
        f"build the block mask with the kernel config's tiles)"
    )


def _next_pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length()


def head_pad(h: int, backend: str) -> int:
    return max(pallas_gpu.MIN_TILE, _next_pow2(h)) if backend == "gpu" else h


def plan(q, k, v, *, scale, block_mask: _bm.BlockMask, kv_len, score_mod, backend: str,
         cfg: TileConfig | None, interpret: bool, bias=None, dropout=None) -> Plan:  # fmt: skip
    """Check that the kernels can run this call and fix its static parameters.

    ``bias``: rank 4 (``masking.check_bias``) or None; ``dropout``: a
    :class:`~efficient_attn.core.masking.Dropout` or None. Raises :class:`Unsupported`
    (with the reason) when the kernels cannot run the call.
    """
    _bm.check_block_mask(block_mask, q.shape[1], k.shape[1], q.shape[0], q.shape[2])
    dtype = jnp.result_type(q)
    if dtype == jnp.float64 and not interpret:
        raise Unsupported("float64 inputs (GPU/TPU kernels run bf16, fp16 and fp32)")
    cfg = cfg or default_config(backend)
    bmin = pallas_gpu.MIN_TILE if backend == "gpu" else pallas_tpu.MIN_TILE
    kmin = pallas_gpu.MIN_TILE if backend == "gpu" else pallas_tpu.MIN_KEY_TILE
    nq, nk = block_mask.tiles.shape[2:]
    bq, over_q = _tile(block_mask.block_q, nq, bmin, "query")
    bk, over_k = _tile(block_mask.block_k, nk, kmin, "key")
    b, tq, n, h = q.shape
    tk, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    if max(h, hv) > 256:
        raise Unsupported(f"head_dim {max(h, hv)} > 256 (the kernels take up to 256)")
    t_pad = (masking.cdiv(tq, bq) * bq, masking.cdiv(tk, bk) * bk)
    idx = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
           jnp.zeros((bq, bk), jnp.int32), jnp.zeros((bq, bk), jnp.int32))  # fmt: skip
    mask_mod = block_mask.mask_mod
    if isinstance(mask_mod, _mods.Full):
        mask_mod = None
    limits = (tq, tk)
    mask = closures.hoist("mask_mod", mask_mod, idx)
    if mask is not None:
        mask = layouts.plan_layouts(mask, backend, b, t_pad, limits, grads=False, heads=n)
    score = closures.hoist("score_mod", score_mod, (jnp.zeros((bq, bk), jnp.float32), *idx))
    if score is not None:
        if score.out.shape != (bq, bk) or score.out.dtype != jnp.float32:
            raise ValueError(
                f"score_mod must return an array of score's shape and dtype {(bq, bk)} float32; "
                f"it returned {score.out.shape} {score.out.dtype}"
            )
        score = layouts.plan_layouts(score, backend, b, t_pad, limits, grads=True, heads=n)
    for c in (mask, score):
        if c is not None:
            evaluate.check_values(c, backend)
    vary = None if bias is None else tuple(d > 1 for d in bias.shape)
    traced = isinstance(scale, jax.core.Tracer)  # a kernel input then, with its gradient
    spec = common.Spec(
        bq=bq, bk=bk, groups=n // kh, q_limit=tq, k_limit=tk,
        scale=None if traced else float(scale),
        has_kv_len=kv_len is not None, mask=mask, score=score, bound_full=over_q or over_k,
        heads_first=BACKENDS[backend].HEADS_FIRST, exact_f32=dtype == jnp.float32, bias=vary,
        dropout=0.0 if dropout is None else dropout.rate,
        dropout_broadcast=dropout is not None and dropout.broadcast, interpret=interpret,
        lists=tuple(block_mask.tiles.shape[:2]),
    )  # fmt: skip
    if backend == "tpu":
        _check_vmem(cfg, spec, dtype, t_pad, h + hv, bias)
    return Plan(backend, cfg, interpret, spec, common.split(block_mask), b, n, kh, tq, tk, hv)


def _check_vmem(cfg: TileConfig, spec: common.Spec, dtype, t_pad, width: int, bias) -> None:
    """The Mosaic kernels keep whole rows in VMEM (double-buffered): K/V of a head in the
    forward and dQ, q/dO of a K/V head's query heads in dK/dV, a query tile's bias row
    (a key tile's bias column in dK/dV), the same of the mods' dense tables; refuse what
    cannot fit."""
    limit = cfg.vmem_limit_bytes or 16 * 2**20
    tq_pad, tk_pad = t_pad
    rows = max(tq_pad * spec.groups, tk_pad) * width * jnp.dtype(dtype).itemsize
    if bias is not None:
        vq, vk = spec.bias[2:]
        item = jnp.dtype(bias.dtype).itemsize if vq and vk else 4
        rows += item * _slab(spec, spec.bias, t_pad)
    for c in (spec.mask, spec.score):  # the mods' dense tables: slabs like a bias's (and grads)
        for lay in () if c is None else c.layouts:
            if lay.tile is not None and lay.tile.onehot is not None:  # a separable table
                g = spec.groups if lay.tile.vary[1] else 1
                rows += 4 * g * math.prod(layouts.onehot_pad(lay.tile))
            elif lay.tile is not None:
                _, vn, vq, _ = lay.tile.vary
                grad = 4 * (spec.groups if vn else 1) * (tq_pad if vq else 8) * spec.bk
                rows += jnp.dtype(lay.store).itemsize * _slab(spec, lay.tile.vary, t_pad)
                rows += grad if lay.grad else 0
    need = 2 * rows
    if need > limit // 2:
        raise Unsupported(
            f"rows of {need / 2**20:.0f} MiB (double-buffered) for a VMEM limit of "
            f"{limit / 2**20:.0f} MiB; raise TileConfig.vmem_limit_bytes"
        )


def _slab(spec: common.Spec, vary, t_pad) -> int:
    """Elements of the larger of a bias-layout array's slabs, ``[bq|1, Tk_pad|1]`` (forward,
    dQ) or ``[G|1, Tq_pad|1, bk|1]`` (dK/dV); a unit dim fills a vector register's 8
    sublanes or 128 lanes."""
    _, vn, vq, vk = vary
    tq_pad, tk_pad = t_pad
    row = (spec.bq if vq else 8) * (tk_pad if vk else 128)
    column = (spec.groups if vn else 1) * (tq_pad if vq else 8) * (spec.bk if vk else 128)
    return max(row, column)
