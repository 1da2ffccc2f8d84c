"""Fused attention over a block mask: the tile engine's contract, run by Pallas kernels.

The same inputs and outputs as :func:`efficient_attn.core.engine.tiled_attention` with
the dot-product score (FlashAttention-2, Dao 2023; FlexAttention's block masks
and mods, Dong et al. 2024): ``(out [B, Tq, N, Hv], lse [B, Tq, N])``,
differentiable in q, k, v and through ``lse``. Lengths need not be tile
multiples (rows and keys are padded here and masked in the kernels), head dims
are padded to what the backend needs, statistics are float32.

Backward: a dK/dV kernel over the transposed tile lists and a dQ kernel over
the forward lists (deterministic: no atomics), from the saved lse and
``delta = rowsum(dO * O) - d lse``. A ``score_mod`` holding arrays (ALiBi's
slopes, a learned bias table) runs in the forward kernel, but its backward is
the XLA engine's (:mod:`efficient_attn.core.engine`, whose forward it recomputes),
which also gives those arrays their gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import blockmask as _bm
from efficient_attn.core import masking
from efficient_attn.core import mods as _mods
from efficient_attn.kernels import common, pallas_gpu, pallas_tpu
from efficient_attn.kernels.common import Unsupported
from efficient_attn.kernels.config import TileConfig, default_config

BACKENDS = {"gpu": pallas_gpu, "tpu": pallas_tpu}


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """Everything static about one fused call (a nondiff argument of the custom_vjp)."""

    backend: str
    cfg: TileConfig
    interpret: bool
    spec: common.Spec
    bm: common.Split  # the block mask, its arrays passed explicitly
    score: common.Split | None
    xla_backward: bool  # score_mod holds arrays: backward by the XLA engine
    tq: int
    tk: int
    hv: int
    bwd: _Plan | None = None  # the backward kernels' own tiles (a second block mask)


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


def _head_pad(h: int, backend: str) -> int:
    return max(pallas_gpu.MIN_TILE, _next_pow2(h)) if backend == "gpu" else h


def plan(q, k, v, *, scale, block_mask: _bm.BlockMask, kv_len, score_mod, backend: str,
         cfg: TileConfig | None, interpret: bool) -> _Plan:  # fmt: skip
    """Check that the kernels can run this call and fix its static parameters.

    Raises :class:`Unsupported` (with the reason) when they cannot.
    """
    if isinstance(scale, jax.core.Tracer):
        raise Unsupported("a traced scale (the kernels take it as a constant)")
    dtype = jnp.result_type(q)
    if dtype == jnp.float64 and not interpret:
        raise Unsupported("float64 inputs (GPU/TPU kernels run bf16, fp16 and fp32)")
    cfg = cfg or default_config(backend)
    bmin = pallas_gpu.MIN_TILE if backend == "gpu" else pallas_tpu.MIN_TILE
    kmin = pallas_gpu.MIN_TILE if backend == "gpu" else pallas_tpu.MIN_KEY_TILE
    nq, nk = block_mask.tiles.shape[2:]
    bq, over_q = _tile(block_mask.block_q, nq, bmin, "query")
    bk, over_k = _tile(block_mask.block_k, nk, kmin, "key")
    _b, tq, n, h = q.shape
    tk, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    if backend == "gpu" and max(h, hv) > 256:
        raise Unsupported(f"head_dim {max(h, hv)} > 256 (the Triton kernels take up to 256)")
    if backend == "tpu":
        _check_vmem(cfg, dtype, masking.cdiv(tq, bq) * bq * (n // kh), masking.cdiv(tk, bk) * bk,
                    h + hv)  # fmt: skip
    idx = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
           jnp.zeros((bq, bk), jnp.int32), jnp.zeros((bq, bk), jnp.int32))  # fmt: skip
    mask_mod = block_mask.mask_mod
    if mask_mod is None or isinstance(mask_mod, _mods.Full):
        mask_split = None
    else:
        mask_split = common.kernel_mod("mask_mod", mask_mod, idx)
    score_split = common.kernel_mod("score_mod", score_mod, (jnp.zeros((bq, bk)), *idx))
    if backend == "tpu" and score_split is not None and score_split.leaves:
        raise Unsupported("a score_mod holding arrays on TPU (not yet in the Mosaic kernel)")
    spec = common.Spec(
        bq=bq, bk=bk, groups=n // kh, q_limit=tq, k_limit=tk, scale=float(scale),
        has_kv_len=kv_len is not None, mask=mask_split, score=score_split,
        bound_full=over_q or over_k, heads_first=BACKENDS[backend].HEADS_FIRST,
        exact_f32=dtype == jnp.float32,
    )  # fmt: skip
    if mask_split is not None and mask_split.leaves:
        spec = _with_views(spec, backend, tq, tk)
    return _Plan(
        backend, cfg, interpret, spec, common.split(block_mask, numpy_static=True), score_split,
        xla_backward=score_split is not None and bool(score_split.leaves),
        tq=tq, tk=tk, hv=v.shape[-1],
    )  # fmt: skip


def _with_views(spec: common.Spec, backend: str, tq: int, tk: int) -> common.Spec:
    """Mask arrays ``[B, T]`` read as ``arr[b, q_idx]``/``arr[b, kv_idx]`` (segment ids) as
    column/row slices (:class:`~efficient_attn.kernels.common.PositionView`): ``bq + bk``
    loads per tile instead of a ``bq x bk`` gather. Required on TPU (Mosaic has no gather);
    on GPU other arrays stay refs that the mod indexes itself."""
    try:
        sides = []
        for x in spec.mask.leaves:
            if np.ndim(x) != 2 or not jnp.issubdtype(jnp.result_type(x), jnp.integer):
                raise Unsupported(
                    f"on TPU a mask_mod's arrays must be int [batch, seq]; it holds "
                    f"{jnp.shape(x)} {jnp.result_type(x)}"
                )
            sides.append((x.shape[1] == tq, x.shape[1] == tk))
        viewed = dataclasses.replace(spec, views=tuple(sides))
        common.check_views(viewed)
        return viewed
    except Unsupported:
        if backend == "tpu":
            raise
        return spec


def _check_vmem(cfg: TileConfig, dtype, q_rows: int, k_rows: int, width: int) -> None:
    """The Mosaic kernels keep whole rows in VMEM (double-buffered): K/V of a head in the
    forward and dQ, q/dO of a K/V head's query heads in dK/dV; refuse what cannot fit."""
    limit = cfg.vmem_limit_bytes or 16 * 2**20
    need = 2 * max(q_rows, k_rows) * width * jnp.dtype(dtype).itemsize
    if need > limit // 2:
        raise Unsupported(
            f"rows of {need / 2**20:.0f} MiB (double-buffered) for a VMEM limit of "
            f"{limit / 2**20:.0f} MiB; raise TileConfig.vmem_limit_bytes"
        )


# ---- layouts ---------------------------------------------------------------------------


def _pad_to(x, axis: int, size: int, fill=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return x if size == x.shape[axis] else jnp.pad(x, pad, constant_values=fill)


def _layout(p: _Plan, x, t_pad: int, h_pad: int):
    """``[B, T, heads, D]`` -> the backend's padded layout."""
    x = _pad_to(_pad_to(x, 1, t_pad), 3, h_pad)
    return jnp.swapaxes(x, 1, 2) if p.spec.heads_first else x


def _unlayout(p: _Plan, x, t: int, d: int):
    x = jnp.swapaxes(x, 1, 2) if p.spec.heads_first else x
    return x[:, :t, :, :d]


def _stats(x, t_pad: int, fill: float):
    """``[B, T, N]`` -> ``[B, N, T_pad, 1]`` float32."""
    x = _pad_to(jnp.asarray(x, jnp.float32), 1, t_pad, fill)
    return jnp.swapaxes(x, 1, 2)[..., None]


def _sizes(p: _Plan, q, v):
    sp = p.spec
    return (
        masking.cdiv(p.tq, sp.bq) * sp.bq,
        masking.cdiv(p.tk, sp.bk) * sp.bk,
        _head_pad(q.shape[-1], p.backend),
        _head_pad(v.shape[-1], p.backend),
    )


def _inputs(p: _Plan, q, k, v):
    """q, k, v in the backend's padded layout."""
    tq_pad, tk_pad, h_pad, hv_pad = _sizes(p, q, v)
    return _layout(p, q, tq_pad, h_pad), _layout(p, k, tk_pad, h_pad), _layout(p, v, tk_pad, hv_pad)


def _counts(num, idx, tile: int, kv_len, batch: int):
    """Live entries of each list per example ``[B, R]``: tiles past ``kv_len[b]`` dropped."""
    num, idx = jnp.asarray(num, jnp.int32), jnp.asarray(idx, jnp.int32)
    if kv_len is None:
        return jnp.broadcast_to(num, (batch, num.shape[0]))
    live = (jnp.arange(idx.shape[1]) < num[:, None])[None] & (
        idx[None] * tile < kv_len[:, None, None]
    )
    return live.sum(-1, dtype=jnp.int32)


def _scalars(p: _Plan, bm, kv_len, batch: int, backward: bool):
    """The int32 scalar inputs: counts ``[B, R]`` and lists ``[R, W]``, partial then full."""
    lists = _bm.union_lists(bm)
    lists = lists[4:] if backward else lists[:4]
    sp = p.spec
    out = []
    for num, idx in (lists[:2], lists[2:]):
        if backward:
            j = np.arange(np.shape(num)[0]) * sp.bk
            cnt = jnp.broadcast_to(jnp.asarray(num, jnp.int32), (batch, len(j)))
            if kv_len is not None:
                cnt = jnp.where(j[None] < kv_len[:, None], cnt, 0)
        else:
            cnt = _counts(num, idx, sp.bk, kv_len, batch)
        out += [cnt, jnp.asarray(idx, jnp.int32)]
    if kv_len is not None:
        out.append(kv_len)
    return out


# ---- the custom_vjp --------------------------------------------------------------------


def _forward(p: _Plan, q, k, v, bm_arrays, score_arrays, kv_len):
    bm = p.bm.rebuild(bm_arrays)
    qx, kx, vx = _inputs(p, q, k, v)
    leaves = _mod_leaves(p, bm, score_arrays, q.shape[0])
    scalars = _scalars(p, bm, kv_len, q.shape[0], backward=False)
    o, lse = BACKENDS[p.backend].forward(p.spec, p.cfg, p.interpret, scalars, qx, kx, vx, leaves)
    out = _unlayout(p, o, p.tq, p.hv)
    lse = jnp.swapaxes(lse[:, :, : p.tq, 0], 1, 2)
    return out, lse


def _mod_leaves(p: _Plan, bm, score_arrays, batch: int):
    mask = () if p.spec.mask is None else p.spec.mask.arrays_of(bm.mask_mod)
    if p.spec.views is not None:  # [B, T] -> column [B, Tq_pad, 1] and row [B, 1, Tk_pad]
        tq_pad = masking.cdiv(p.tq, p.spec.bq) * p.spec.bq
        tk_pad = masking.cdiv(p.tk, p.spec.bk) * p.spec.bk
        pairs = []
        for (is_col, is_row), x in zip(p.spec.views, mask, strict=True):
            x = jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch, x.shape[1]))
            col = _pad_to(x, 1, tq_pad) if is_col else jnp.zeros((batch, tq_pad), jnp.int32)
            row = _pad_to(x, 1, tk_pad) if is_row else jnp.zeros((batch, tk_pad), jnp.int32)
            pairs += [col[:, :, None], row[:, None, :]]
        mask = tuple(pairs)
    return (*mask, *score_arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(p, q, k, v, bm_arrays, score_arrays, kv_len, bwd_arrays):
    return _forward(p, q, k, v, bm_arrays, score_arrays, kv_len)


def _fused_fwd(p, q, k, v, bm_arrays, score_arrays, kv_len, bwd_arrays):
    out, lse = _forward(p, q, k, v, bm_arrays, score_arrays, kv_len)
    return (out, lse), (q, k, v, bm_arrays, score_arrays, kv_len, bwd_arrays, out, lse)


def _xla_backward(p: _Plan, res, cotangents):
    """Gradients through the XLA engine (score_mods holding arrays), its forward recomputed."""
    from efficient_attn.core import engine

    q, k, v, bm_arrays, score_arrays, kv_len, _, _, _ = res
    bm = p.bm.rebuild(bm_arrays)

    def run(q, k, v, score_arrays):
        return engine.tiled_attention(
            q, k, v, scale=p.spec.scale, block_mask=bm, kv_len=kv_len,
            score_mod=p.score.rebuild(score_arrays),
        )  # fmt: skip

    _, vjp = jax.vjp(run, q, k, v, score_arrays)
    dq, dk, dv, dscore = vjp(cotangents)
    return dq, dk, dv, None, dscore, None, None


def _fused_bwd(p, res, cotangents):
    if p.xla_backward:
        return _xla_backward(p, res, cotangents)
    q, k, v, bm_arrays, score_arrays, kv_len, bwd_arrays, out, lse = res
    dout, dlse = cotangents
    if p.bwd is not None:
        p, bm_arrays = p.bwd, bwd_arrays
    bm = p.bm.rebuild(bm_arrays)
    b = q.shape[0]
    tq_pad, _, _, hv_pad = _sizes(p, q, v)
    qx, kx, vx = _inputs(p, q, k, v)
    dout = jnp.asarray(dout).astype(q.dtype)
    dox = _layout(p, dout, tq_pad, hv_pad)
    # d lse / d s = p: the lse cotangent enters as ds = p * (dp - (delta - dlse)).
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), -1) - dlse
    delta = _stats(delta, tq_pad, 0.0)
    lse = _stats(jnp.where(lse == -jnp.inf, jnp.inf, lse), tq_pad, jnp.inf)  # p = 0: no key
    leaves = _mod_leaves(p, bm, score_arrays, b)
    mod = BACKENDS[p.backend]
    args = (qx, kx, vx, dox, lse, delta, leaves)
    dkx, dvx = mod.dkdv(p.spec, p.cfg, p.interpret, _scalars(p, bm, kv_len, b, True), *args)
    dqx = mod.dq(p.spec, p.cfg, p.interpret, _scalars(p, bm, kv_len, b, False), *args)
    dq = _unlayout(p, dqx, p.tq, q.shape[-1])
    dk = _unlayout(p, dkx, p.tk, k.shape[-1])
    dv = _unlayout(p, dvx, p.tk, v.shape[-1])
    return dq, dk, dv, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    block_mask: _bm.BlockMask,
    kv_len: jax.Array | None = None,
    score_mod: Any = None,
    backend: str = "gpu",
    config: TileConfig | None = None,
    interpret: bool = False,
    backward_block_mask: _bm.BlockMask | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused attention over ``block_mask``: ``(out [B, Tq, N, Hv], lse [B, Tq, N])``.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv]; ``block_mask`` built
    at power-of-two tiles (a single tile per row or column may be any size);
    kv_len: int ``[B]`` or None; ``score_mod(score, b, h, q_idx, kv_idx)``.
    ``backend``: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic); ``interpret`` runs
    the kernels on any device. ``backward_block_mask``: the same mask at the
    backward kernels' tiles (None: ``block_mask``'s). Raises :class:`Unsupported`
    for calls the kernels cannot run (the message says why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid backends: {', '.join(BACKENDS)}")
    kv_len = None if kv_len is None else jnp.asarray(kv_len, jnp.int32)
    kw = {"kv_len": kv_len, "score_mod": score_mod, "backend": backend, "cfg": config,
          "interpret": interpret}  # fmt: skip
    p = plan(q, k, v, scale=scale, block_mask=block_mask, **kw)
    bwd_arrays = ()
    if backward_block_mask is not None:
        p = dataclasses.replace(p, bwd=plan(q, k, v, scale=scale, block_mask=backward_block_mask,
                                            **kw))  # fmt: skip
        bwd_arrays = p.bwd.bm.leaves
    score_arrays = () if p.score is None else p.score.leaves
    return _fused(p, q, k, v, p.bm.leaves, score_arrays, kv_len, bwd_arrays)
