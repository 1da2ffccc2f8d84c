"""Fused attention over a block mask: the tile engine's contract, run by Pallas kernels.

The same inputs and outputs as :func:`efficient_attn.core.engine.tiled_attention` with
the dot-product score (FlashAttention-2, Dao 2023; FlexAttention's block masks
and mods, Dong et al. 2024): ``(out [B, Tq, N, Hv], lse [B, Tq, N])``,
differentiable in q, k, v, the dense bias, the float arrays a ``score_mod``
closes over, and through ``lse``. Lengths need not be tile multiples (rows and
keys are padded here and masked in the kernels), head dims are padded to what
the backend needs, statistics are float32. Dropout is the XLA engine's
counter-based mask (:class:`~efficient_attn.core.masking.Dropout`).

Backward: a dK/dV kernel over the transposed tile lists and a dQ kernel over
the forward lists (no atomics but for Triton's general gathers of a mod's
arrays), from the saved lse and ``delta = rowsum(dO * O) - d lse``; the dK/dV
kernel also emits the gradients of a ``score_mod``'s arrays, and one of the two
the bias gradient (:mod:`efficient_attn.kernels.extras`).
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
from efficient_attn.kernels import extras
from efficient_attn.kernels.config import TileConfig
from efficient_attn.kernels.plan import BACKENDS, Plan, head_pad, plan

# ---- layouts ---------------------------------------------------------------------------


def _pad_to(x, axis: int, size: int, fill=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return x if size == x.shape[axis] else jnp.pad(x, pad, constant_values=fill)


def _layout(p: Plan, x, t_pad: int, h_pad: int):
    """``[B, T, heads, D]`` -> the backend's padded layout."""
    x = _pad_to(_pad_to(x, 1, t_pad), 3, h_pad)
    return jnp.swapaxes(x, 1, 2) if p.spec.heads_first else x


def _unlayout(p: Plan, x, t: int, d: int):
    x = jnp.swapaxes(x, 1, 2) if p.spec.heads_first else x
    return x[:, :t, :, :d]


def _stats(x, t_pad: int, fill: float):
    """``[B, T, N]`` -> ``[B, N, T_pad, 1]`` float32."""
    x = _pad_to(jnp.asarray(x, jnp.float32), 1, t_pad, fill)
    return jnp.swapaxes(x, 1, 2)[..., None]


def _inputs(p: Plan, q, k, v):
    """q, k, v in the backend's padded layout."""
    h_pad, hv_pad = head_pad(q.shape[-1], p.backend), head_pad(v.shape[-1], p.backend)
    return (_layout(p, q, p.tq_pad, h_pad), _layout(p, k, p.tk_pad, h_pad),
            _layout(p, v, p.tk_pad, hv_pad))  # fmt: skip


def _counts(num, idx, tile: int, kv_len, batch: int):
    """Live entries of each list per example: ``num [Bm, Hm, R]``, ``idx [Bm, Hm, R, W]`` ->
    ``[B * Hm, R]``, tiles past ``kv_len[b]`` dropped."""
    num, idx = jnp.asarray(num, jnp.int32), jnp.asarray(idx, jnp.int32)
    hm, r = num.shape[1:]
    if kv_len is None:
        return jnp.broadcast_to(num, (batch, hm, r)).reshape(batch * hm, r)
    live = (jnp.arange(idx.shape[-1]) < num[..., None]) & (idx * tile < kv_len[:, None, None, None])
    return live.sum(-1, dtype=jnp.int32).reshape(batch * hm, r)


def _lists(p: Plan, bm, backward: bool):
    """``(num, idx)`` partial then full, ``[Bm, Hl, R]`` and ``[Bm, Hl, R, W]``: a program's
    key tiles (forward, dQ) or query tiles (dK/dV; per K/V head, as (query tile, query head)
    pairs for a per-head mask under GQA, :func:`efficient_attn.core.blockmask.group_lists`)."""
    if not backward:
        names = ("kv_num", "kv_indices", "full_kv_num", "full_kv_indices")
    elif p.spec.pairs:
        return _bm.group_lists(bm, p.spec.groups)
    else:
        names = ("q_num", "q_indices", "full_q_num", "full_q_indices")
    return tuple(getattr(bm, n) for n in names)


def _scalars(p: Plan, bm, kv_len, seed, backward: bool):
    """The int32 scalar inputs: counts ``[B * Hm, R]`` and lists ``[Bm * Hm * R, W]``
    (partial then full; ``(Bm, Hm)``: the block mask's, K/V heads in dK/dV; each program
    reads its own, :func:`~efficient_attn.kernels.common.list_rows`), ``kv_len``, the
    dropout seed (uint32 bits as int32)."""
    lists = _lists(p, bm, backward)
    sp = p.spec
    out = []
    for num, idx in (lists[:2], lists[2:]):
        idx = jnp.asarray(idx, jnp.int32)
        if backward:
            hl, r = np.shape(num)[1:]
            j = np.arange(r) * sp.bk
            cnt = jnp.broadcast_to(jnp.asarray(num, jnp.int32), (p.batch, hl, r))
            if kv_len is not None:
                cnt = jnp.where(j < kv_len[:, None, None], cnt, 0)
            cnt = cnt.reshape(p.batch * hl, r)
        else:
            cnt = _counts(num, idx, sp.bk, kv_len, p.batch)
        out += [cnt, idx.reshape(-1, idx.shape[-1])]
    if kv_len is not None:
        out.append(kv_len)
    if sp.dropout:
        out.append(jax.lax.bitcast_convert_type(jnp.asarray(seed, jnp.uint32), jnp.int32))
    return out


def _extra_inputs(p: Plan, kernel: str, scale, bias, mask_arrays, score_arrays):
    """``(array, Block)`` of the traced scale, the bias and the mods' arrays of one kernel."""
    out = []
    if p.spec.scale is None:
        scale = jnp.reshape(scale, (1,)).astype(jnp.float32)
        out.append((scale, dataclasses.replace(extras.whole(scale), smem=True)))
    if bias is not None:
        out.append((extras.bias_input(p, bias), extras.bias_block(p, kernel)))
    for c, arrays in ((p.spec.mask, mask_arrays), (p.spec.score, score_arrays)):
        xs, blocks = extras.mod_inputs(p, c, arrays, kernel)
        out += list(zip(xs, blocks, strict=True))
    return out


# ---- the custom_vjp --------------------------------------------------------------------


def _forward(p: Plan, q, k, v, scale, bm_arrays, mask_arrays, score_arrays, kv_len, bias, seed):
    bm = p.bm.rebuild(bm_arrays)
    qx, kx, vx = _inputs(p, q, k, v)
    scalars = _scalars(p, bm, kv_len, seed, backward=False)
    extra = _extra_inputs(p, "forward", scale, bias, mask_arrays, score_arrays)
    o, lse = BACKENDS[p.backend].forward(p.spec, p.cfg, p.interpret, scalars, qx, kx, vx, extra)
    out = _unlayout(p, o, p.tq, p.hv)
    lse = jnp.swapaxes(lse[:, :, : p.tq, 0], 1, 2)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(p, q, k, v, scale, bm_arrays, mask_arrays, score_arrays, kv_len, bias, seed,
           bwd_arrays):  # fmt: skip
    return _forward(p, q, k, v, scale, bm_arrays, mask_arrays, score_arrays, kv_len, bias, seed)


def _fused_fwd(p, q, k, v, scale, bm_arrays, mask_arrays, score_arrays, kv_len, bias, seed,
               bwd_arrays):  # fmt: skip
    args = (q, k, v, scale, bm_arrays, mask_arrays, score_arrays, kv_len, bias, seed)
    out, lse = _forward(p, *args)
    return (out, lse), (*args, bwd_arrays, out, lse)


def _fused_bwd(p, res, cotangents):
    (q, k, v, scale, bm_arrays, mask_arrays, score_arrays, kv_len, bias, seed, bwd_arrays, out,
     lse) = res  # fmt: skip
    dout, dlse = cotangents
    forward_arrays = (bm_arrays, mask_arrays, score_arrays)
    if p.bwd is not None:
        p = p.bwd
        bm_arrays, mask_arrays, score_arrays = bwd_arrays
    sp = p.spec
    bm = p.bm.rebuild(bm_arrays)
    qx, kx, vx = _inputs(p, q, k, v)
    dout = jnp.asarray(dout).astype(q.dtype)
    dox = _layout(p, dout, p.tq_pad, head_pad(v.shape[-1], p.backend))
    # d lse / d s = p: the lse cotangent enters as ds = p * (dp - (delta - dlse)).
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), -1) - dlse
    delta = _stats(delta, p.tq_pad, 0.0)
    lse = _stats(jnp.where(lse == -jnp.inf, jnp.inf, lse), p.tq_pad, jnp.inf)  # p = 0: no key
    mod = BACKENDS[p.backend]
    args = (qx, kx, vx, dox, lse, delta)
    # dK/dV: the score_mod's array gradients, and the bias gradient if it varies along keys
    extra_in = _extra_inputs(p, "dkdv", scale, bias, mask_arrays, score_arrays)
    extra_out, aliases = [], {}
    if sp.bias_dkdv:
        shape, block, _ = extras.bias_grad_output(p)
        extra_out.append((jax.ShapeDtypeStruct(shape, jnp.float32), block))
    if sp.score is not None and sp.grads_of_score():
        shapes, blocks, zeros, al = extras.grad_outputs(p, sp.score)
        first_out, first_in = len(extra_out), len(extra_in)
        extra_out += [(jax.ShapeDtypeStruct(s, jnp.float32), b) for s, b in
                      zip(shapes, blocks, strict=True)]  # fmt: skip
        extra_in += [(z, extras.whole(z)) for z in zeros]
        aliases = {first_in + i: first_out + o for o, i in al.items()}
    scalars = _scalars(p, bm, kv_len, seed, True)
    dkx, dvx, *gk = mod.dkdv(sp, p.cfg, p.interpret, scalars, *args, extra_in, extra_out, aliases)
    extra_q = []
    if bias is not None and not sp.bias_dkdv:
        shape, block, _ = extras.bias_grad_output(p)
        extra_q.append((jax.ShapeDtypeStruct(shape, jnp.float32), block))
    if sp.scale is None:
        shape, block = extras.row_sums(p)
        extra_q.append((jax.ShapeDtypeStruct(shape, jnp.float32), block))
    extra_in = _extra_inputs(p, "dq", scale, bias, mask_arrays, score_arrays)
    scalars = _scalars(p, bm, kv_len, seed, False)
    dqx, *gq = mod.dq(sp, p.cfg, p.interpret, scalars, *args, extra_in, extra_q)
    dq = _unlayout(p, dqx, p.tq, q.shape[-1])
    dk = _unlayout(p, dkx, p.tk, k.shape[-1])
    dv = _unlayout(p, dvx, p.tk, v.shape[-1])
    dbias = None
    if bias is not None:
        buf = gk.pop(0) if sp.bias_dkdv else gq.pop(0)
        dbias = extras.bias_grad(p, buf, bias.shape, bias.dtype)
    dscale = None
    if sp.scale is None:
        dscale = jnp.sum(gq.pop()).astype(jnp.result_type(scale)).reshape(jnp.shape(scale))
    dscore = tuple(None for _ in score_arrays)
    if gk:
        dscore = extras.array_grads(p, sp.score, gk, score_arrays)
    nones = jax.tree.map(lambda _: None, (forward_arrays, bwd_arrays, kv_len, seed))
    fwd_n, bwd_n, kv_n, seed_n = nones
    if bwd_arrays:  # the backward plan's arrays were used: their slot gets the gradients
        bwd_n = (bwd_n[0], bwd_n[1], dscore)
    else:
        fwd_n = (fwd_n[0], fwd_n[1], dscore)
    return dq, dk, dv, dscale, *fwd_n, kv_n, dbias, seed_n, bwd_n


def _arrays(p: Plan) -> tuple:
    """The arrays a plan passes explicitly: the block mask's, the mask_mod's, the score_mod's
    (each hoisting has its own: the backward's plan passes its own)."""
    sp = p.spec
    return (p.bm.leaves, () if sp.mask is None else sp.mask.arrays,
            () if sp.score is None else sp.score.arrays)  # fmt: skip


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
    bias: jax.Array | None = None,
    dropout: masking.Dropout | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused attention over ``block_mask``: ``(out [B, Tq, N, Hv], lse [B, Tq, N])``.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv]; ``block_mask`` built
    at power-of-two tiles (a single tile per row or column may be any size);
    kv_len: int ``[B]`` or None; ``score_mod(score, b, h, q_idx, kv_idx)`` (its
    closed-over arrays and the block mask's ``mask_mod``'s become kernel inputs);
    ``bias``: broadcastable to ``[B, N, Tq, Tk]``, added to the scaled logits
    before ``score_mod``; ``dropout``: a :class:`~efficient_attn.core.masking.Dropout`
    of the weights. ``backend``: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic);
    ``interpret`` runs the kernels on any device. ``backward_block_mask``: the same
    mask at the backward kernels' tiles (None: ``block_mask``'s). Raises
    :class:`~efficient_attn.kernels.Unsupported` for calls the kernels cannot run
    (the message says why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid backends: {', '.join(BACKENDS)}")
    kv_len = None if kv_len is None else jnp.asarray(kv_len, jnp.int32)
    if bias is not None:
        bias = masking.check_bias(bias, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    kw = {"kv_len": kv_len, "score_mod": score_mod, "backend": backend, "cfg": config,
          "interpret": interpret, "bias": bias, "dropout": dropout}  # fmt: skip
    p = plan(q, k, v, scale=scale, block_mask=block_mask, **kw)
    bwd_arrays = ()
    if backward_block_mask is not None:
        p = dataclasses.replace(p, bwd=plan(q, k, v, scale=scale, block_mask=backward_block_mask,
                                            **kw))  # fmt: skip
        bwd_arrays = _arrays(p.bwd)
    seed = None if dropout is None else dropout.seed
    scale_in = jnp.asarray(scale, jnp.float32) if p.spec.scale is None else None
    out, lse = _fused(p, q, k, v, scale_in, *_arrays(p), kv_len, bias, seed, bwd_arrays)
    return out, lse
