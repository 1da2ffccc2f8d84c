"""Closures, dense bias, dropout and a traced scale in the fused kernels.

Interpret mode runs both backends' kernels on the CPU (Triton's at 16 x 16 tiles,
Mosaic's at 8 x 128 with two key tiles); lowering for CUDA and TPU checks that the
default implementation keeps these calls in the fused kernels (no fallback).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.core import engine, masking, mods
from efficient_attn.kernels import dispatch, fused_attention
from tests.conftest import make_qkv, rel_err
from tests.test_flex import reference64, segments
from tests.test_pallas import _kernels, _lower

F32_TOL = 2e-5
#: backend -> (query tile, key tile, key length): two key tiles on each.
BACKENDS = {"gpu": (16, 16, 29), "tpu": (8, 128, 150)}
TQ = 21


def _fused(backend, q, k, v, *, causal=False, mask_mod=None, score_mod=None, bias=None,
           dropout=None, kv_lengths=None, scale=0.3, tiles=None):  # fmt: skip
    bq, bk = tiles or BACKENDS[backend][:2]
    b, tq, n = q.shape[:3]
    bm = engine.plan_block_mask(tq, k.shape[1], batch=b, heads=n, causal=causal,
                                mask_mod=mask_mod, block_q=bq, block_k=bk)  # fmt: skip
    return fused_attention(q, k, v, scale=scale, block_mask=bm, kv_len=kv_lengths,
                           score_mod=score_mod, backend=backend, interpret=True, bias=bias,
                           dropout=dropout)[0]  # fmt: skip


def _value_and_grads(attn, q, k, v, arrays, dout):
    """``attn(q, k, v, arrays)`` and its gradients in q, k, v and the float ``arrays``."""

    def f(q, k, v, arrays):
        out = attn(q, k, v, arrays)
        return jnp.sum(out * dout), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, arrays)
    return [out, *jax.tree.leaves(grads)]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_closures_match_library_mods_and_float64(backend):
    """A document mask, ALiBi with learned slopes and a per-key bias, written as lambdas over
    arrays (traced, so gradients reach the slopes and the bias) and as library mods."""
    tk = BACKENDS[backend][2]
    q, k, v = make_qkv(2, TQ, tk, 4, 2, 16, seed=1)
    q_seg, k_seg = segments(2, TQ, 3), segments(2, tk, 3, seed=1)
    slopes = jnp.asarray(mods.alibi_slopes(4))
    key_bias = jnp.asarray(np.random.default_rng(2).standard_normal((2, tk)), jnp.float32)
    dout = np.random.default_rng(3).standard_normal((2, TQ, 4, 16)).astype(np.float32)

    def closures(arrays):
        slopes, key_bias = arrays
        docs = lambda b, h, i, j: jnp.asarray(q_seg)[b, i] == jnp.asarray(k_seg)[b, j]  # noqa: E731

        def score(s, b, h, i, j):
            return s - slopes[h] * jnp.abs(i - j).astype(s.dtype) + key_bias[b, j]

        return {"mask_mod": docs, "score_mod": score}

    def library(arrays):
        slopes, key_bias = arrays
        bias = lambda s, b, h, i, j: s + key_bias[b, j]  # noqa: E731
        return {"mask_mod": mods.document_mask(q_seg, k_seg),
                "score_mod": mods.chain_scores(mods.alibi(slopes), bias)}  # fmt: skip

    got = jax.jit(lambda *x: _value_and_grads(
        lambda q, k, v, a: _fused(backend, q, k, v, causal=True, **closures(a)), *x, dout))(
        q, k, v, (slopes, key_bias))  # fmt: skip
    lib = jax.jit(lambda *x: _fused(backend, *x[:3], causal=True, **library(x[3])))(
        q, k, v, (slopes, key_bias)
    )  # the same call with library mods (forward)
    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, slopes, key_bias, dout)]
        ref = jax.jit(lambda q, k, v, a, dout: _value_and_grads(
            lambda q, k, v, a: reference64(q, k, v, causal=True, scale=0.3, **closures(a)),
            q, k, v, a, dout))(*x64[:3], tuple(x64[3:5]), x64[5])  # fmt: skip
        ref = [np.asarray(r) for r in ref]
    assert rel_err(got[0], lib) < F32_TOL
    for what, g, r in zip(("out", "dq", "dk", "dv", "dslopes", "dbias"), got, ref, strict=True):
        assert rel_err(g, r) < F32_TOL, (what, rel_err(g, r))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gathered_table_closure_on_both_kernels(backend):
    """A relative-position table read at ``[h, q - k]``: a pointer gather on Triton (its
    gradient added atomically); on Mosaic (no gather) the small table sits in SMEM and is
    read by one select per entry (its gradient a per-program partial sum). A table with
    more entries than Mosaic selects among is expanded there outside the kernels
    (tests/test_pallas_tables.py checks its gradient)."""
    tk = BACKENDS[backend][2]
    q, k, v = make_qkv(1, TQ, tk, 2, 1, 16, seed=4)
    table = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9)), jnp.float32)
    dout = np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)

    def score(table, m=4):
        return lambda s, b, h, i, j: s + table[h, jnp.clip(j - i, -m, m) + m]

    got = jax.jit(
        lambda *x: _value_and_grads(
            lambda q, k, v, t: _fused(backend, q, k, v, score_mod=score(t)), *x, dout
        )
    )(q, k, v, table)
    lib = jax.jit(lambda *x: _fused(backend, *x[:3],
                                    score_mod=mods.relative_position_bias(x[3])))(
        q, k, v, table)  # fmt: skip
    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, table, dout)]
        ref = jax.jit(
            lambda *x: _value_and_grads(
                lambda q, k, v, t: reference64(q, k, v, scale=0.3, score_mod=score(t)), *x
            )
        )(*x64)
    assert rel_err(got[0], lib) < F32_TOL
    for what, g, r in zip(("out", "dq", "dk", "dv", "dtable"), got, ref, strict=True):
        assert rel_err(g, np.asarray(r)) < F32_TOL, (what, rel_err(g, np.asarray(r)))
    if backend == "tpu":
        wide = jnp.asarray(np.random.default_rng(7).standard_normal((2, 65)), jnp.float32)
        got = _fused("tpu", q, k, v, score_mod=score(wide, 32))
        with jax.enable_x64(True):
            x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, wide)]
            ref = np.asarray(reference64(*x64[:3], scale=0.3, score_mod=score(x64[3], 32)))
        assert rel_err(got, ref) < F32_TOL


BIASES = {  # name -> (shape, causal, kv_lengths): None stands for Tk
    "full": ((2, 4, TQ, None), True, [None, 11]),  # dK/dV writes its gradient tiles
    "heads-keys": ((1, 4, 1, None), False, None),  # dK/dV sums it over queries and examples
    "batch-queries": ((2, 1, TQ, 1), False, None),  # dQ sums it over keys and heads
}
BIAS_CASES = [("gpu", "full"), ("tpu", "heads-keys")]
SLOW_BIAS = [pytest.param(b, n, marks=pytest.mark.slow) for b in BACKENDS for n in BIASES
             if (b, n) not in BIAS_CASES]  # fmt: skip


@pytest.mark.parametrize(("backend", "name"), BIAS_CASES + SLOW_BIAS)
def test_bias_dropout_and_traced_scale_match_the_xla_engine(backend, name):
    """The bias gradient (through lse too: a bias constant along keys moves only lse), and
    dropout with the XLA engine's mask: one key drops the same weights on every path (the
    counter-based hash of core.masking), forward and backward; a traced scale's gradient."""
    tk = BACKENDS[backend][2]
    q, k, v = make_qkv(2, TQ, tk, 4, 2, 16, seed=7)
    dout = np.random.default_rng(8).standard_normal(q.shape).astype(np.float32)
    shape, causal, kv = BIASES[name]
    shape = tuple(tk if d is None else d for d in shape)
    bias = jnp.asarray(np.random.default_rng(9).standard_normal(shape), jnp.float32)
    kv = None if kv is None else jnp.asarray([tk if x is None else x for x in kv])
    kw = {"causal": causal, "kv_lengths": kv, "dropout": masking.dropout(0.25, jax.random.key(3)),
          "score_mod": mods.soft_cap(3.0)}  # fmt: skip
    fused = lambda q, k, v, a: _fused_lse(backend, q, k, v, bias=a[0], scale=a[1], **kw)  # noqa: E731
    xla = lambda q, k, v, a: _xla_lse(q, k, v, bias=a[0], scale=a[1], **kw)  # noqa: E731
    arrays = (bias, jnp.float32(0.3))
    got = jax.jit(lambda *x: _value_and_grads(fused, *x, dout))(q, k, v, arrays)
    ref = jax.jit(lambda *x: _value_and_grads(xla, *x, dout))(q, k, v, arrays)
    for what, g, r in zip(("out", "dq", "dk", "dv", "dbias", "dscale"), got, ref, strict=True):
        assert rel_err(g, r) < F32_TOL, (what, rel_err(g, r))
    kw["dropout"] = None
    undropped = jax.jit(lambda *x: _fused_lse(backend, *x, bias=bias, scale=0.3, **kw))(q, k, v)
    assert rel_err(got[0], undropped) > 0.05  # the mask drops something


def _fused_lse(backend, q, k, v, *, causal, kv_lengths, scale, bias, dropout, score_mod):
    """The output plus a term in lse, so a bias's gradient is nonzero whatever it varies along."""
    bq, bk, _ = BACKENDS[backend]
    bm = engine.plan_block_mask(q.shape[1], k.shape[1], batch=2, heads=4, causal=causal,
                                block_q=bq, block_k=bk)  # fmt: skip
    out, lse = fused_attention(q, k, v, scale=scale, block_mask=bm, kv_len=kv_lengths,
                               backend=backend, interpret=True, bias=bias, dropout=dropout,
                               score_mod=score_mod)  # fmt: skip
    return out + jnp.sin(jnp.where(jnp.isfinite(lse), lse, 0.0))[..., None]


def _xla_lse(q, k, v, *, causal, kv_lengths, scale, bias, dropout, score_mod):
    out, lse = engine.attend(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
                             block_q=16, block_k=16, bias=bias, dropout=dropout,
                             score_mod=score_mod)  # fmt: skip
    return out + jnp.sin(jnp.where(jnp.isfinite(lse), lse, 0.0))[..., None]


def test_drop_in_bias_and_dropout_reach_the_kernels():
    """ea.dot_product_attention's bias and dropout through implementation='pallas'."""
    q, k, v = make_qkv(1, TQ, 29, 2, 2, 16, seed=12)
    bias = np.random.default_rng(13).standard_normal((1, 2, TQ, 29)).astype(np.float32)
    kw = {"bias": bias, "is_causal": True, "dropout_rate": 0.2, "dropout_rng": jax.random.key(1)}
    got = jax.jit(lambda *x: ea.dot_product_attention(*x, implementation="pallas",
                                                      interpret=True, **kw))(q, k, v)  # fmt: skip
    ref = ea.dot_product_attention(q, k, v, implementation="xla", **kw)
    assert rel_err(got, ref) < F32_TOL


T_LOWER = 1024


def _lowered_kernels(platform: str, fn, *args) -> tuple[set, set, tuple]:
    """Kernels in the lowered forward and gradient of ``fn``, and the fallbacks recorded."""
    before = len(dispatch.fallbacks())
    floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))  # noqa: E731
    fwd = _lower(fn, args, platform)
    bwd = _lower(jax.grad(loss, argnums=floats), args, platform)
    return _kernels(fwd), _kernels(bwd), dispatch.fallbacks()[before:]


LOWERED = {
    "document-closure": (
        lambda x, seg: ea.attention(x, x, x, method="blockwise", causal=True,
                                    mask_mod=lambda b, h, i, j: seg[b, i] == seg[b, j]),
        jax.ShapeDtypeStruct((2, T_LOWER), jnp.int32),
    ),
    "alibi-closure-learned-slopes": (
        lambda x, s: ea.attention(x, x, x, method="blockwise", causal=True,
                                  score_mod=lambda sc, b, h, i, j: sc + s[h] * (j - i)),
        jax.ShapeDtypeStruct((4,), jnp.float32),
    ),
    "bias-dropout": (
        lambda x, bias: ea.dot_product_attention(x, x, x, bias=bias, dropout_rate=0.1,
                                                 dropout_rng=jax.random.key(0)),
        jax.ShapeDtypeStruct((1, 4, T_LOWER, T_LOWER), jnp.bfloat16),
    ),
}  # fmt: skip


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_closures_bias_dropout_lower_to_the_fused_kernels_only(platform):
    x = jax.ShapeDtypeStruct((2, T_LOWER, 4, 64), jnp.bfloat16)
    for name, (fn, arg) in LOWERED.items():
        fwd, bwd, fell_back = _lowered_kernels(platform, fn, x, arg)
        assert fwd == {"forward"} and bwd == {"forward", "dkdv", "dq"}, (name, fwd, bwd)
        assert fell_back == (), (name, fell_back)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_flex_mod_runs_in_both_kernels(backend):
    """tests/test_flex.py's mods (library and lambdas) forward on both kernels: none refused (at
    this length BigBird's block table and the relative-position table are small enough for
    Mosaic's selects)."""
    from tests.test_flex import MODS, T

    q, k, v = make_qkv(2, T, T, 4, 2, 16, seed=14)
    for name, mask_mod, score_mod in MODS:
        ref = ea.attention(q, k, v, method="dense", scale=0.3, mask_mod=mask_mod,
                           score_mod=score_mod)  # fmt: skip
        got = _fused(backend, q, k, v, mask_mod=mask_mod, score_mod=score_mod)
        assert rel_err(got, ref) < F32_TOL, name


ON_DEVICE = jax.default_backend() in ("gpu", "tpu")


@pytest.mark.skipif(not ON_DEVICE, reason="compiled kernels need a GPU or TPU (device_check.sh)")
def test_compiled_closures_bias_dropout_on_the_accelerator():
    """The compiled kernels (not interpreted) against the XLA engine at awkward sizes: a document
    closure, ALiBi with learned slopes, a per-key bias closure, a dense bias and dropout."""
    tq, tk = 1000, 1500
    q, k, v = make_qkv(2, tq, tk, 8, 2, 96, seed=15)
    seg_q, seg_k = jnp.asarray(segments(2, tq, 5)), jnp.asarray(segments(2, tk, 5, seed=1))
    slopes = jnp.asarray(mods.alibi_slopes(8))
    key_bias = jnp.asarray(np.random.default_rng(16).standard_normal((2, tk)), jnp.float32)
    bias = jnp.asarray(np.random.default_rng(17).standard_normal((1, 8, tq, tk)), jnp.float32)
    dout = np.random.default_rng(18).standard_normal(q.shape).astype(np.float32)

    def attn(implementation, q, k, v, arrays):
        slopes, key_bias, bias = arrays
        score = lambda s, b, h, i, j: s - slopes[h] * jnp.abs(i - j) + key_bias[b, j]  # noqa: E731
        return ea.dot_product_attention(
            q, k, v, bias=bias, dropout_rate=0.1, dropout_rng=jax.random.key(2),
            method="blockwise", implementation=implementation,
            mask_mod=lambda b, h, i, j: seg_q[b, i] == seg_k[b, j], score_mod=score,
        )  # fmt: skip

    arrays = (slopes, key_bias, bias)
    got = jax.jit(lambda *x: _value_and_grads(lambda *a: attn("pallas", *a), *x, dout))(
        q, k, v, arrays)  # fmt: skip
    ref = jax.jit(lambda *x: _value_and_grads(lambda *a: attn("xla", *a), *x, dout))(
        q, k, v, arrays)  # fmt: skip
    for what, g, r in zip(("out", "dq", "dk", "dv", "dslopes", "dkey_bias", "dbias"), got, ref,
                          strict=True):  # fmt: skip
        assert rel_err(g, r) < 1e-4, (what, rel_err(g, r))
