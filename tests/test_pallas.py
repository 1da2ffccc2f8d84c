"""The fused Pallas kernels: interpret mode against float64, lowering for CUDA and TPU on a CPU.

Interpret mode runs the kernels' own code on the CPU (tiny sizes: 16-row tiles,
lengths under 40 that are not tile multiples). Lowering with
``lowering_platforms=("cuda",)`` / ``("tpu",)`` runs Pallas' Triton and Mosaic
lowerings, which reject what only the hardware would otherwise reveal
(non-power-of-two shapes, unsupported ops).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.core import engine, mods
from efficient_attn.kernels import TileConfig, default_config, dispatch, fused_attention
from efficient_attn.methods.additive import ADDITIVE
from tests.conftest import make_qkv, rel_err
from tests.test_flex import reference64, segments

F32_TOL = 2e-5
ON_DEVICE = jax.default_backend() in ("gpu", "tpu")
TILES = TileConfig(block_q=16, block_k=16, bwd_block_q=32, bwd_block_k=16)  # bwd: own lists


def _pallas(q, k, v, **kw):
    return ea.attention(q, k, v, method="blockwise", implementation="pallas", interpret=True,
                        kernel_config=TILES, **kw)  # fmt: skip


def _grads(fn, q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(dout))


CASES = [  # (id, Tq, Tk, N, K, kwargs)
    ("gqa-causal-window-softcap-kvlen", 37, 29, 4, 2, {
        "causal": True, "kv_lengths": np.array([29, 11]),
        "mask_mod": mods.sliding_window(9, 0, offset=29 - 37), "score_mod": mods.soft_cap(2.0),
    }),
    ("documents-cross", 33, 40, 2, 1, {
        "mask_mod": mods.document_mask(segments(2, 33, 3), segments(2, 40, 3, seed=1)),
    }),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_float64_reference(case):
    _, tq, tk, n, kh, kw = case
    q, k, v = make_qkv(2, tq, tk, n, kh, 16, seed=2)
    kw = {**kw, "scale": 0.3}
    dout = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
    got = jax.jit(lambda *x: _grads(lambda *a: _pallas(*a, **kw), *x, dout))(q, k, v)
    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, dout)]
        ref = jax.jit(lambda *x: _grads(lambda *a: reference64(*a, **kw), *x))(*x64)
        ref = [np.asarray(r) for r in ref]
    for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert rel_err(g, r) < F32_TOL, (what, rel_err(g, r))


def test_lse_and_its_gradient_match_the_xla_engine():
    """The engine's custom_vjp carries the lse cotangent: the kernels' delta subtracts it."""
    q, k, v = make_qkv(1, 21, 35, 2, 2, 8, seed=3)
    bm = engine.plan_block_mask(21, 35, batch=1, heads=2, causal=True, block_q=16, block_k=16)
    kv = jnp.array([30])

    def loss(attn):
        def f(q, k, v):
            out, lse = attn(q, k, v, scale=0.5, block_mask=bm, kv_len=kv)
            return jnp.sum(out**2) + jnp.sum(jnp.sin(lse))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    ref = loss(engine.tiled_attention)(q, k, v)
    got = loss(lambda *a, **kw: fused_attention(*a, **kw, interpret=True))(q, k, v)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert rel_err(g, r) < F32_TOL


def test_tpu_kernels_in_interpret_mode():
    """The Mosaic kernels (scalar-prefetch lists, heads-first layout, segment ids read through
    column and row views) on the CPU: two key tiles."""
    q, k, v = make_qkv(2, 19, 150, 2, 1, 32, seed=5)
    docs = mods.document_mask(segments(2, 19, 2), segments(2, 150, 2, seed=1))
    kw = {"causal": True, "kv_lengths": np.array([150, 90]), "scale": 0.2, "mask_mod": docs}
    bm = engine.plan_block_mask(19, 150, batch=2, heads=2, causal=True, mask_mod=docs,
                               block_q=8, block_k=128)  # fmt: skip
    dout = np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)

    def attn(q, k, v):
        return fused_attention(q, k, v, scale=0.2, block_mask=bm, kv_len=kw["kv_lengths"],
                               backend="tpu", interpret=True)[0]  # fmt: skip

    got = jax.jit(lambda *x: _grads(attn, *x, dout))(q, k, v)
    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, dout)]
        ref = jax.jit(lambda *x: _grads(lambda *a: reference64(*a, **kw), *x))(*x64)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, np.asarray(r)) < F32_TOL


def test_user_block_mask_at_other_tiles_is_replanned():
    """A block mask at tiles the kernels cannot run (48 x 64 here) is re-planned from its mod."""
    q, k, v = make_qkv(2, 70, 70, 2, 2, 16)
    docs = mods.document_mask(segments(2, 70, 3))
    bm = ea.block_mask(docs, 70, 70, batch=2, block_q=48, block_k=64)
    got = jax.jit(lambda *x: _pallas(*x, block_mask=bm, causal=True))(q, k, v)
    ref = ea.attention(q, k, v, method="blockwise", implementation="xla", block_mask=bm,
                       causal=True)  # fmt: skip
    assert rel_err(got, ref) < F32_TOL


def test_score_mod_with_float_arrays_gets_gradients():
    """ALiBi's slopes: d slopes from the dK/dV kernel (per-program partial sums)."""
    q, k, v = make_qkv(1, 20, 20, 4, 2, 8, seed=7)
    slopes = jnp.asarray(mods.alibi_slopes(4))

    def f(attn, slopes, q):
        return jnp.sum(attn(q, k, v, causal=True, score_mod=mods.alibi(slopes)) ** 2)

    got = jax.jit(jax.grad(lambda s, q: f(_pallas, s, q), argnums=(0, 1)))(slopes, q)
    ref = jax.grad(lambda s, q: f(lambda *a, **kw: ea.attention(*a, method="dense", **kw), s, q),
                   argnums=(0, 1))(slopes, q)  # fmt: skip
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < 1e-4


def test_bf16_within_twice_dense_bf16_error():
    q, k, v = make_qkv(2, 37, 37, 4, 2, 32, seed=8)
    kw = {"causal": True, "mask_mod": mods.sliding_window(20)}
    with jax.enable_x64(True):
        ref = np.asarray(reference64(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)),
                                     scale=32**-0.5, **kw))  # fmt: skip
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    dense = ea.attention(qb, kb, vb, method="dense", **kw)
    got = jax.jit(lambda *x: _pallas(*x, **kw))(qb, kb, vb)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, ref) < 2 * rel_err(dense, ref)


def test_selection_errors_and_fallbacks():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 8)
    if not ON_DEVICE:
        with pytest.raises(ValueError, match=r"needs a GPU or TPU.*interpret=True"):
            ea.attention(q, k, v, method="blockwise", implementation="pallas")
    with pytest.raises(ValueError, match="valid implementations: 'auto', 'xla', 'pallas'"):
        ea.attention(q, k, v, method="blockwise", implementation="triton")
    with pytest.raises(ValueError, match="interpret=True runs the Pallas kernels"):
        ea.attention(q, k, v, method="blockwise", implementation="xla", interpret=True)
    with pytest.raises(ValueError, match="kernel_config must be"):
        ea.attention(q, k, v, method="blockwise", kernel_config=(16, 16))
    wide = jnp.zeros((1, 8, 2, 320))
    with pytest.raises(ValueError, match="cannot run this call: head_dim 320 > 256"):
        _pallas(wide, wide, wide)
    with pytest.raises(ValueError, match="block_q=48 must be a positive power of two"):
        TileConfig(block_q=48)
    assert default_config("tpu", "TPU v6 lite").block_k == 1024
    assert default_config("gpu", "NVIDIA H200") == default_config("gpu")


def _lower(fn, args, platform: str) -> str:
    with dispatch.kernel_branches("all"):  # the suite traces "present" (conftest)
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernels(text: str) -> set[str]:
    return set(re.findall(r"ea_flash_(forward|dkdv|dq)", text))


T_LOWER = 4096
LOWER_MASKS = {
    "causal": lambda seg: None,
    "window": lambda seg: mods.sliding_window(1023),
    "documents": lambda seg: mods.document_mask(seg),
}


def _lowered(platform, dtype, head_dim, mask):
    q = jax.ShapeDtypeStruct((1, T_LOWER, 4, head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, T_LOWER, 2, head_dim), dtype)
    seg = jax.ShapeDtypeStruct((1, T_LOWER), jnp.int32)

    def attn(q, k, v, seg):
        return ea.attention(q, k, v, method="blockwise", causal=True,
                            mask_mod=LOWER_MASKS[mask](seg))  # fmt: skip

    def loss(q, k, v, seg):
        return jnp.sum(attn(q, k, v, seg).astype(jnp.float32))

    fwd = _lower(attn, (q, k, k, seg), platform)
    bwd = _lower(jax.grad(loss, argnums=(0, 1, 2)), (q, k, k, seg), platform)
    return fwd, bwd


@pytest.mark.parametrize(
    "dtype",
    [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)],  # fp16: slow (suite time)
    ids=["bf16", "fp16"],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_implementation_lowers_triton_kernels_for_cuda(dtype, head_dim):
    for mask in LOWER_MASKS:
        fwd, bwd = _lowered("cuda", dtype, head_dim, mask)
        assert "__gpu$xla.gpu.triton" in fwd and _kernels(fwd) == {"forward"}, mask
        assert "__gpu$xla.gpu.triton" in bwd, mask
        assert _kernels(bwd) == {"forward", "dkdv", "dq"}, mask


def test_default_implementation_lowers_mosaic_kernels_for_tpu():
    for mask in LOWER_MASKS:
        fwd, bwd = _lowered("tpu", jnp.bfloat16, 128, mask)
        assert "tpu_custom_call" in fwd and _kernels(fwd) == {"forward"}, mask
        assert _kernels(bwd) == {"forward", "dkdv", "dq"}, mask
    x = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)
    before = len(dispatch.fallbacks())
    for size in (17, 129):  # a gather: selects from a small table, else expanded outside
        table = mods.relative_position_bias(np.zeros((4, size), np.float32))
        text = _lower(lambda q, t=table: ea.attention(q, q, q, method="blockwise", score_mod=t),
                      (x,), "tpu")  # fmt: skip
        assert "tpu_custom_call" in text, size
    assert dispatch.fallbacks()[before:] == ()


def test_cpu_default_is_the_xla_engine_and_other_scores_stay_there():
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    cpu = _lower(lambda q: ea.attention(q, q, q, method="blockwise", causal=True), (q,), "cpu")
    assert "triton" not in cpu and "tpu_custom_call" not in cpu
    arrays = ea.init_arrays("additive", jax.random.key(0), 64, dtype=jnp.bfloat16)
    cuda = _lower(lambda q: ea.attention(q, q, q, method="additive", causal=True, **arrays),
                  (q,), "cuda")  # fmt: skip
    assert "triton" not in cuda
    x = jnp.zeros((1, 16, 2, 8))
    kw = {"causal": True, "kv_lengths": None, "scale": 1.0, "block_q": 16, "block_k": 16}
    with pytest.raises(ValueError, match=r"cannot run this call: score .* kernels compute q \. k"):
        dispatch.attend(x, x, x, score=ADDITIVE, params=jnp.ones(8), implementation="pallas",
                        interpret=True, **kw)  # fmt: skip
    before = len(dispatch.fallbacks())
    dispatch.attend(x, x, x, score=ADDITIVE, params=jnp.ones(8), implementation="auto",
                    interpret=True, **kw)  # fmt: skip
    assert "kernels compute q . k" in dispatch.fallbacks()[before]


def test_pallas_mha_baseline_pads_lengths_and_lowers_for_cuda():
    """JAX's own op needs block multiples (JAX #27224): the wrapper pads and hides the padding."""
    from efficient_attn.methods import baselines

    q, k, v = make_qkv(1, 40, 40, 2, 2, 24, value_dim=16)
    got = jax.jit(lambda *x: baselines.pallas_mha(
        *x, causal=True, kv_lengths=None, scale=0.3, block_q=16, block_k=16, interpret=True,
    ))(q, k, v)  # fmt: skip
    assert rel_err(got, ea.attention(q, k, v, method="dense", causal=True, scale=0.3)) < F32_TOL
    x = jax.ShapeDtypeStruct((1, 4000, 4, 128), jnp.bfloat16)

    def loss(q):
        out = baselines.pallas_mha(q, q, q, causal=True, kv_lengths=None, scale=0.1)
        return jnp.sum(out.astype(jnp.float32))

    text = _lower(jax.grad(loss), (x,), "cuda")
    assert {"mha_forward", "mha_backward"} <= set(re.findall(r'name = "(mha_\w+)"', text))
    for method in ("pallas_mha", "tokamax"):
        reason = ea.get_method(method).available()
        if jax.default_backend() != "gpu":
            assert "GPUs only" in reason or "not installed" in reason
        if reason is not None:
            with pytest.raises(ValueError, match="not available here"):
                ea.attention(q, k, v, method=method)


@pytest.mark.skipif(not ON_DEVICE, reason="compiled kernels need a GPU or TPU (device_check.sh)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_compiled_kernels_on_the_accelerator(dtype):
    """The compiled kernels (not interpreted) at awkward sizes, forward and backward."""
    tq, tk = 1000, 1500
    q, k, v = make_qkv(2, tq, tk, 8, 2, 96, seed=9)
    window = mods.sliding_window(300, 0, offset=tk - tq)
    variants = {
        "causal-window-softcap": {"causal": True, "mask_mod": window,
                                  "score_mod": mods.soft_cap(20.0)},
        "documents": {"mask_mod": mods.document_mask(segments(2, tq, 5), segments(2, tk, 5, 1))},
    }  # fmt: skip
    dout = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    for name, kw in variants.items():
        kw = {**kw, "kv_lengths": np.array([tk, 999]), "scale": 96**-0.5}

        def fused(*x, kw=kw):
            return ea.attention(*x, method="blockwise", implementation="pallas", **kw)

        def dense(*x, kw=kw):
            return ea.attention(*x, method="dense", **kw)

        xs = [jnp.asarray(x, dtype) for x in (q, k, v)]
        got = jax.jit(lambda *x, f=fused: _grads(f, *x, jnp.asarray(dout, dtype)))(*xs)
        base = jax.jit(lambda *x, f=dense: _grads(f, *x, jnp.asarray(dout, dtype)))(*xs)
        with jax.enable_x64(True):
            x64 = [jnp.asarray(x, jnp.float64) for x in xs]
            ref = _grads(lambda *a, kw=kw: reference64(*a, **kw), *x64,
                         jnp.asarray(dout, jnp.float64))  # fmt: skip
        for what, g, d, r in zip(("out", "dq", "dk", "dv"), got, base, ref, strict=True):
            r = np.asarray(r)
            bound = 1e-4 if dtype == jnp.float32 else 2 * rel_err(d, r) + 1e-3
            assert rel_err(g, r) < bound, (name, what, rel_err(g, r), rel_err(d, r))


def test_throughput_column_only_for_accelerator_rows():
    from efficient_attn.sweep import results

    row = {"flops_per_s": 3.5e14, "env": {"platform": "cpu"}}
    assert results.tflops(row) is None
    assert results.tflops({**row, "env": {"platform": "gpu"}}) == pytest.approx(350.0)


def test_local_runs_the_kernels():
    """``local`` (a sliding window on the tile engine) selects the kernels like ``blockwise``."""
    q, k, v = make_qkv(1, 40, 40, 2, 1, 16)
    kw = {"method": "local", "window": 7, "causal": True}
    got = jax.jit(lambda *x: ea.attention(*x, implementation="pallas", interpret=True, **kw))
    ref = ea.attention(q, k, v, implementation="xla", **kw)
    assert rel_err(got(q, k, v), ref) < F32_TOL
    x = jax.ShapeDtypeStruct((1, 4096, 4, 64), jnp.bfloat16)
    assert _kernels(_lower(lambda q: ea.attention(q, q, q, **kw), (x,), "cuda")) == {"forward"}


def test_kernel_branches_present_traces_the_xla_engine_alone_on_a_cpu():
    q = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)

    def traced(mode):  # a new function per mode: jit does not retrace one it has seen
        with dispatch.kernel_branches(mode):
            f = jax.jit(lambda q: ea.attention(q, q, q, method="blockwise", causal=True))
            return f.trace(q)

    assert "platform_index" in str(traced("all").jaxpr)
    present = traced("present")
    assert "platform_index" not in str(present.jaxpr)
    assert "triton" not in present.lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(ValueError, match="valid modes: all, present"):
        dispatch.kernel_branches("some").__enter__()
