"""Tables a mod gathers from, in the Mosaic kernels (which have no gather).

A dense table ``[.., q_idx, .., kv_idx]`` (a dense mask ``m[b, h, q_idx, kv_idx]``, the
drop-in's boolean ``mask=``, a float table in a ``score_mod``) enters the TPU kernels
blocked like the dense bias; a separable one (BigBird's block table) is read by one-hot
products; other reads computed from the positions (relative-position tables, large
arrays at scalar indices, query views with a gradient) are expanded outside the kernels
(:mod:`efficient_attn.kernels.layouts`). Interpreted against float64, values and
gradients, and lowered for TPU without a fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.core import mods
from efficient_attn.kernels import Unsupported, closures, layouts
from tests.conftest import make_qkv, rel_err
from tests.test_flex import reference64
from tests.test_pallas_mods import BACKENDS, F32_TOL, TQ, _fused, _lowered_kernels, _value_and_grads


def _check(backend, q, k, v, floats, masks, dout, kw_of, causal=False, tiles=None):
    """A kernel (interpreted) against float64: values and gradients (in q, k, v and
    ``floats``; ``kw_of(floats, masks)``: the mods, ``masks`` traced too)."""
    got = jax.jit(lambda q, k, v, f, m: _value_and_grads(
        lambda q, k, v, f: _fused(backend, q, k, v, causal=causal, tiles=tiles, **kw_of(f, m)),
        q, k, v, f, dout))(q, k, v, floats, masks)  # fmt: skip
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
    if backend == "tpu":
        for name, mod in kw_of(table, mask).items():
            assert _kinds(name, mod, tk) == {"tile"}, name


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
    if backend == "tpu":  # 16-row query tiles: the mask's slabs in bfloat16
        _check(backend, q, k, v, (), mask, dout, kw_of, tiles=(16, 128))


def test_separable_tables_on_the_mosaic_kernels():
    """BigBird's block table ``tab[q_idx // bs, kv_idx // bs]`` (19 x 19 entries, past Mosaic's
    selects) and a constant float table ``tab[h, q_idx // 4, kv_idx // 8]`` in a score_mod,
    read by one-hot products: values and gradients in q, k, v against float64."""
    tk = BACKENDS["tpu"][2]
    q, k, v = make_qkv(2, TQ, tk, 4, 2, 16, seed=25)
    rng = np.random.default_rng(26)
    table = rng.standard_normal((4, -(-TQ // 4), -(-tk // 8))).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    bigbird = mods.bigbird_mask(TQ, tk, block=8, num_random_blocks=1)

    def kw_of(f, m):
        score = lambda s, b, h, i, j: s + jnp.asarray(table)[h, i // 4, j // 8]  # noqa: E731
        return {"mask_mod": bigbird, "score_mod": score}

    _check("tpu", q, k, v, (), (), dout, kw_of)
    for name, mod in kw_of((), ()).items():  # both read by one-hot products, not selects
        assert _kinds(name, mod, tk) == {"onehot"}, name


def test_expanded_tables_with_gradients_on_the_mosaic_kernels():
    """Gathers computed from the positions that are neither dense nor separable-without-a-
    gradient: a relative-position table ``rel[h, kv_idx - q_idx + Tq - 1]`` of Tq + Tk - 1
    entries and a learned separable table ``tab[q_idx // 4, kv_idx // 8]``, expanded outside
    the kernels into the dense layout: values and gradients (the tables' too)."""
    tk = BACKENDS["tpu"][2]
    q, k, v = make_qkv(1, TQ, tk, 2, 1, 16, seed=27)
    rng = np.random.default_rng(28)
    rel = jnp.asarray(rng.standard_normal((2, TQ + tk - 1)), jnp.float32)
    tab = jnp.asarray(rng.standard_normal((-(-TQ // 4), -(-tk // 8))), jnp.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)

    def kw_of(f, m):
        rel, tab = f
        return {"score_mod": lambda s, b, h, i, j: s + rel[h, j - i + TQ - 1] + tab[i // 4, j // 8]}

    _check("tpu", q, k, v, (rel, tab), (), dout, kw_of, causal=True)


def test_expanded_points_and_query_views_with_gradients_on_the_mosaic_kernels():
    """A learned array of more than SMEM's 4096 elements read at scalar indices
    (``big[h * 1000 + b]``) and a learned per-query temperature ``temp[b, q_idx]``, both
    expanded (``[B|1, N|1, 1, 1]`` and ``[B, 1, Tq_pad, 1]``): values and gradients."""
    tk = BACKENDS["tpu"][2]
    q, k, v = make_qkv(2, TQ, tk, 4, 2, 16, seed=29)
    rng = np.random.default_rng(30)
    big = jnp.asarray(1 + 0.3 * rng.standard_normal(5000), jnp.float32)
    temp = jnp.asarray(1 + 0.3 * rng.standard_normal((2, TQ)), jnp.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)

    def kw_of(f, m):
        big, temp = f
        return {"score_mod": lambda s, b, h, i, j: s * temp[b, i] * big[h * 1000 + b]}

    _check("tpu", q, k, v, (big, temp), (), dout, kw_of)


def test_tables_indexed_by_other_arrays_on_the_mosaic_kernels():
    """A table read at indices another closed-over array gives (document-pair tables
    ``pair[seg_q[b, q_idx], seg_k[b, kv_idx]]``): a boolean one by one-hot products, a
    learned float one expanded (with its gradient)."""
    tk = BACKENDS["tpu"][2]
    q, k, v = make_qkv(2, TQ, tk, 2, 1, 16, seed=31)
    rng = np.random.default_rng(32)
    seg_q, seg_k = rng.integers(0, 12, (2, TQ)), rng.integers(0, 12, (2, tk))
    pair = jnp.asarray(rng.random((12, 12)) > 0.3)
    weight = jnp.asarray(rng.standard_normal((12, 12)), jnp.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)

    def kw_of(w, m):
        sq, sk = jnp.asarray(seg_q), jnp.asarray(seg_k)
        return {"mask_mod": lambda b, h, i, j: m[sq[b, i], sk[b, j]] | (i == j),
                "score_mod": lambda s, b, h, i, j: s + w[sq[b, i], sk[b, j]]}  # fmt: skip

    _check("tpu", q, k, v, weight, pair, dout, kw_of)
    # concrete (no gradient): both by one-hot products, the segment ids as views
    kinds = {n: _kinds(n, mod, tk) for n, mod in kw_of(weight, pair).items()}
    assert kinds == {"mask_mod": {"onehot", "view"}, "score_mod": {"onehot", "view"}}, kinds


def test_what_mosaic_still_refuses():
    """A large table read by two different gathers (neither dense nor separable) is refused
    on TPU, the reason naming Mosaic's missing gather."""
    tk = BACKENDS["tpu"][2]
    q, k, v = make_qkv(1, TQ, tk, 2, 1, 16, seed=33)
    rel = jnp.zeros((2, TQ + tk), jnp.float32)
    score = lambda s, b, h, i, j: s + rel[h, j - i + TQ] + rel[h, i - j + TQ]  # noqa: E731
    with pytest.raises(Unsupported, match=r"shape \(2, 171\) is read other than .* no gather"):
        _fused("tpu", q, k, v, score_mod=score)


def _kinds(name, mod, tk):
    """How the TPU kernels read ``mod``'s arrays at this file's shapes."""
    bq, bk, _ = BACKENDS["tpu"]
    idx = (jnp.zeros((), jnp.int32),) * 2 + (jnp.zeros((bq, bk), jnp.int32),) * 2
    example = idx if name == "mask_mod" else (jnp.zeros((bq, bk), jnp.float32), *idx)
    c = layouts.plan_layouts(closures.hoist(name, mod, example), "tpu", 2, (24, 256), (TQ, tk),
                             grads=name == "score_mod")  # fmt: skip
    return {r.kind for r in c.reads.values()}


T_LOWER = 1024
TABLES = {
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
    "relative-position-table": (
        lambda x, rel: ea.attention(x, x, x, method="blockwise", causal=True,
                                    score_mod=lambda s, b, h, i, j: s + rel[h, j - i + 1023]),
        jax.ShapeDtypeStruct((4, 2 * T_LOWER - 1), jnp.float32),
    ),
    "per-query-temperature": (
        lambda x, t: ea.attention(x, x, x, method="blockwise", causal=True,
                                  score_mod=lambda s, b, h, i, j: s * t[b, i]),
        jax.ShapeDtypeStruct((2, T_LOWER), jnp.float32),
    ),
    "large-point-reads": (
        lambda x, big: ea.attention(x, x, x, method="blockwise", causal=True,
                                    score_mod=lambda s, b, h, i, j: s * big[h * 1000 + b]),
        jax.ShapeDtypeStruct((5000,), jnp.float32),
    ),
    # BigBird's table too, but its ``//`` lowers (lax.sign) only with a TPU attached
    "separable-block-table": (
        lambda x, t: ea.attention(x, x, x, method="blockwise",
                                  mask_mod=lambda b, h, i, j: t[i >> 4, j >> 4]),
        jax.ShapeDtypeStruct((T_LOWER // 16, T_LOWER // 16), jnp.bool_),
    ),
}  # fmt: skip


#: Lowered in the default suite; the rest are marked slow (suite time).
DEFAULT_TABLES = ("drop-in-bool-mask", "relative-position-table", "separable-block-table")


@pytest.mark.parametrize(
    "name",
    [n if n in DEFAULT_TABLES else pytest.param(n, marks=pytest.mark.slow) for n in TABLES],
)
def test_tables_lower_to_the_mosaic_kernels_only(name):
    x = jax.ShapeDtypeStruct((2, T_LOWER, 4, 64), jnp.bfloat16)
    fn, arg = TABLES[name]
    fwd, bwd, fell_back = _lowered_kernels("tpu", fn, x, arg)
    assert fwd == {"forward"} and bwd == {"forward", "dkdv", "dq"}, (name, fwd, bwd)
    assert fell_back == (), (name, fell_back)
