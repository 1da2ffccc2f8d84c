"""Dense tables a mod reads at ``[.., q_idx, .., kv_idx]`` in the Mosaic kernels.

A dense mask (``m[b, h, q_idx, kv_idx]``, the drop-in's boolean ``mask=``) or a
float table in a ``score_mod`` enters the TPU kernels blocked like the dense bias
(:mod:`efficient_attn.kernels.layouts`): interpreted against float64, values and
gradients, and lowered for TPU without a fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.core import mods
from tests.conftest import make_qkv, rel_err
from tests.test_flex import reference64
from tests.test_pallas_mods import BACKENDS, F32_TOL, TQ, _fused, _lowered_kernels, _value_and_grads


def _check(backend, q, k, v, floats, masks, dout, kw_of, causal=False):
    """A kernel (interpreted) against float64: values and gradients (in q, k, v and
    ``floats``; ``kw_of(floats, masks)``: the mods, ``masks`` traced too)."""
    got = jax.jit(lambda q, k, v, f, m: _value_and_grads(
        lambda q, k, v, f: _fused(backend, q, k, v, causal=causal, **kw_of(f, m)), q, k, v, f,
        dout))(q, k, v, floats, masks)  # fmt: skip
    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, dout)]
        f64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), floats)
        ref = jax.jit(lambda q, k, v, f, m, dout: _value_and_grads(
            lambda q, k, v, f: reference64(q, k, v, causal=causal, scale=0.3, **kw_of(f, m)),
            q, k, v, f, dout))(*x64[:3], f64, masks, x64[3])  # fmt: skip
    assert len(got) == len(ref)
    for n, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert rel_err(g, np.asarray(r)) < F32_TOL, (n, rel_err(g, np.asarray(r)))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_dense_mask_closure_and_float_table(backend):
    """``m[b, h, q_idx, kv_idx]`` (per example and head, under GQA) and a learned table
    ``tab[h, q_idx, kv_idx]`` in a score_mod, with its gradient: on Mosaic blocked like the
    bias, on Triton pointer gathers (its gradient by atomic adds)."""
    tk = BACKENDS[backend][2]
    q, k, v = make_qkv(2, TQ, tk, 4, 2, 16, seed=21)
    rng = np.random.default_rng(22)
    mask = jnp.asarray(rng.random((2, 4, TQ, tk)) > 0.3)
    table = jnp.asarray(rng.standard_normal((4, TQ, tk)), jnp.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)

    def kw_of(tab, m):
        return {"mask_mod": lambda b, h, i, j: m[b, h, i, j],
                "score_mod": lambda s, b, h, i, j: s + tab[h, i, j]}  # fmt: skip

    _check(backend, q, k, v, table, mask, dout, kw_of, causal=True)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_drop_in_bool_mask(backend):
    """The drop-in's ``mask=`` (one ``[Tq, Tk]`` mask for every example and head: its
    broadcast axes read at constants) as the mask_mod the drop-in builds."""
    tk = BACKENDS[backend][2]
    q, k, v = make_qkv(2, TQ, tk, 2, 2, 16, seed=23)
    rng = np.random.default_rng(24)
    mask = jnp.asarray(rng.random((TQ, tk)) > 0.5)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    kw_of = lambda f, m: {"mask_mod": mods.bool_mask(m, 2, 2, TQ, tk)}  # noqa: E731
    _check(backend, q, k, v, (), mask, dout, kw_of)


T_LOWER = 1024
DENSE = {
    "drop-in-bool-mask": (
        lambda x, m: ea.dot_product_attention(x, x, x, mask=m),
        jax.ShapeDtypeStruct((2, 1, T_LOWER, T_LOWER), jnp.bool_),
    ),
    "dense-mask-closure": (
        lambda x, m: ea.attention(x, x, x, method="blockwise",
                                  mask_mod=lambda b, h, i, j: m[b, h, i, j]),
        jax.ShapeDtypeStruct((2, 4, T_LOWER, T_LOWER), jnp.bool_),
    ),
    "float-table-score": (
        lambda x, t: ea.attention(x, x, x, method="blockwise", causal=True,
                                  score_mod=lambda s, b, h, i, j: s + t[i, j]),
        jax.ShapeDtypeStruct((T_LOWER, T_LOWER), jnp.float32),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_tables_lower_to_the_mosaic_kernels_only(name):
    x = jax.ShapeDtypeStruct((2, T_LOWER, 4, 64), jnp.bfloat16)
    fn, arg = DENSE[name]
    fwd, bwd, fell_back = _lowered_kernels("tpu", fn, x, arg)
    assert fwd == {"forward"} and bwd == {"forward", "dkdv", "dq"}, (name, fwd, bwd)
    assert fell_back == (), (name, fell_back)
