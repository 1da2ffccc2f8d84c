"""Per-(b, h) tile lists in the fused kernels: a mask that differs per example or head.

Each program ``(b, h, tile)`` runs the lists of its own ``(b mod Bm, h mod Hm)``
(not their union over the batch and heads); the dK/dV kernel of a K/V head runs
(query tile, query head) pairs of its group under GQA. Interpret mode on the CPU
(Triton's 16 x 16 tiles, Mosaic's 8 x 128) against the XLA engine and float64;
the scalar-prefetch counts and lists themselves; lowering for CUDA and TPU. The
XLA engine's loops per group against its shared loops over the union.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.core import blockmask, engine, masking, mods
from efficient_attn.core.engine.groups import own_lists
from efficient_attn.kernels import fused_attention
from efficient_attn.kernels.fused import _scalars
from efficient_attn.kernels.plan import plan
from tests.conftest import make_qkv, rel_err
from tests.test_flex import reference64, segments
from tests.test_pallas import _kernels, _lower

F32_TOL = 2e-5
#: backend -> (query tile, key tile, Tq, Tk)
BACKENDS = {"gpu": (16, 16, 40, 45), "tpu": (8, 128, 24, 150)}


def _masks(tq, tk):
    """name -> mask_mod: documents per example (Bm = 2); a window per head and example
    (Bm = 2, Hm = 4 over 2 K/V heads: the dK/dV kernel's (query tile, head) pairs)."""
    return {
        "documents": mods.document_mask(segments(2, tq, 3), segments(2, tk, 3, seed=1)),
        "heads": lambda b, h, i, j: jnp.abs(i - j + 5 * b) <= 6 * h + 2,
    }


def _block_mask(backend, mask_mod, b=2, n=4):
    bq, bk, tq, tk = BACKENDS[backend]
    return engine.plan_block_mask(tq, tk, batch=b, heads=n, causal=False, mask_mod=mask_mod,
                                  block_q=bq, block_k=bk)  # fmt: skip


def _value_and_grads(attn, q, k, v, dout):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, *vjp(dout))


#: "heads" varies per example and head; per-example documents alone are also in
#: test_pallas_mods.py's closures test (fast, both backends), so here they are slow.
MASK_CASES = [(b, "heads") for b in BACKENDS] + [
    pytest.param(b, "documents", marks=pytest.mark.slow) for b in BACKENDS
]


@pytest.mark.parametrize(("backend", "mask"), MASK_CASES)
def test_per_example_and_per_head_masks_match_xla_and_float64(backend, mask):
    bq, _, tq, tk = BACKENDS[backend]
    q, k, v = make_qkv(2, tq, tk, 4, 2, 16, seed=21)
    dout = np.random.default_rng(22).standard_normal(q.shape).astype(np.float32)
    kv = jnp.asarray([tk, tk - 19])
    mask_mod = _masks(tq, tk)[mask]
    bm = _block_mask(backend, mask_mod)
    assert bm.tiles.shape[:2] == ((2, 1) if mask == "documents" else (2, 4))

    def fused(q, k, v):
        return fused_attention(q, k, v, scale=0.3, block_mask=bm, kv_len=kv, backend=backend,
                               interpret=True)[0]  # fmt: skip

    def xla(q, k, v):
        return engine.attend(q, k, v, causal=False, mask_mod=mask_mod, kv_lengths=kv, scale=0.3,
                             block_q=bq, block_k=16)[0]  # fmt: skip

    got = jax.jit(lambda *x: _value_and_grads(fused, *x, dout))(q, k, v)
    ref = got  # the XLA engine (per-group loops) on one backend's tiles: compile time
    if backend == "gpu":
        ref = jax.jit(lambda *x: _value_and_grads(xla, *x, dout))(q, k, v)
    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, dout)]
        r64 = jax.jit(lambda q, k, v, d: _value_and_grads(
            lambda q, k, v: reference64(q, k, v, mask_mod=mask_mod, kv_lengths=kv, scale=0.3),
            q, k, v, d))(*x64)  # fmt: skip
        r64 = [np.asarray(r) for r in r64]
    for what, g, r, r2 in zip(("out", "dq", "dk", "dv"), got, ref, r64, strict=True):
        assert rel_err(g, r) < F32_TOL, (what, rel_err(g, r))
        assert rel_err(g, r2) < F32_TOL, (what, rel_err(g, r2))


def test_each_program_runs_only_its_own_tiles():
    """Example b, head h sees key tile ``b + 2 (h mod 2)`` only (a full tile): the union over
    the batch and heads would be every key tile, partial. The forward's scalar-prefetch
    lists name exactly that tile per (b, h, query tile) (none past ``kv_len``), the dK/dV
    lists the (query tile, query head) pairs of a K/V head that see its key tile."""
    b, n, kh, tq, tk = 2, 4, 2, 32, 64
    nq, nk = tq // 16, tk // 16
    q, k, v = make_qkv(b, tq, tk, n, kh, 16, seed=23)
    mask_mod = lambda b, h, i, j: j // 16 == b + 2 * (h % 2)  # noqa: E731
    bm = engine.plan_block_mask(tq, tk, batch=b, heads=n, causal=False, mask_mod=mask_mod,
                                block_q=16, block_k=16)  # fmt: skip
    assert bm.tiles.shape == (b, n, nq, nk)
    kv = jnp.asarray([tk, 20])
    p = plan(q, k, v, scale=0.3, block_mask=bm, kv_len=kv, score_mod=None, backend="gpu",
             cfg=None, interpret=True)  # fmt: skip
    p_cnt, _, f_cnt, f_idx, _ = (np.asarray(x) for x in _scalars(p, bm, kv, None, False))
    assert p_cnt.shape == (b * n, nq) and not p_cnt.any()  # no partial tile anywhere
    want = np.array([[bb + 2 * (h % 2) for h in range(n)] for bb in range(b)])  # [B, N]
    live = want * 16 < np.asarray(kv)[:, None]  # example 1 has keys [0, 20): tile 3 is dead
    np.testing.assert_array_equal(f_cnt.reshape(b, n, nq), np.repeat(live[..., None], nq, -1))
    assert f_idx.shape == (b * n * nq, 1)  # one tile per program, not the union's four
    np.testing.assert_array_equal(f_idx.reshape(b, n, nq), np.repeat(want[..., None], nq, -1))
    # dK/dV: per K/V head c, key tile j: the pairs i * G + g of query heads c * G + g (G = 2)
    p_cnt, _, f_cnt, f_idx, _ = (np.asarray(x) for x in _scalars(p, bm, kv, None, True))
    assert not p_cnt.any() and f_cnt.shape == (b * kh, nk)
    cnt, pairs = f_cnt.reshape(b, kh, nk), f_idx.reshape(b, kh, nk, -1)
    for bb in range(b):
        for c in range(kh):
            for j in range(nk):
                g = [g for g in range(2) if bb + 2 * g == j]  # h % 2 == g for h = 2c + g
                alive = j * 16 < kv[bb]
                assert cnt[bb, c, j] == (nq * len(g) if alive else 0), (bb, c, j)
                if g and alive:
                    assert sorted(pairs[bb, c, j, :nq]) == [i * 2 + g[0] for i in range(nq)]


def test_group_lists_on_device_equal_the_static_ones():
    """A per-head mask over traced data (built on device) lists the same pairs as over NumPy."""
    widths = np.array([3, 9, 17, 40])

    def lists(w):
        bm = blockmask.block_mask(lambda b, h, i, j: jnp.abs(i - j) <= jnp.asarray(w)[h], 40, 45,
                                  heads=4, block_q=16, block_k=16)  # fmt: skip
        return blockmask.group_lists(bm, 2)

    static = lists(widths)
    traced = [np.asarray(x) for x in jax.jit(lists)(jnp.asarray(widths))]
    assert isinstance(static[1], np.ndarray) and static[1].shape[:3] == (1, 2, 3)
    for num, idx in ((0, 1), (2, 3)):
        np.testing.assert_array_equal(static[num], traced[num])
        live = np.arange(static[idx].shape[-1]) < static[num][..., None]
        got = traced[idx][..., : static[idx].shape[-1]]
        np.testing.assert_array_equal(np.where(live, static[idx], -1), np.where(live, got, -1))


def test_group_lists_rejects_bad_groups():
    bm = blockmask.block_mask(lambda b, h, i, j: i >= j - h, 32, 32, heads=3, block_q=16,
                              block_k=16)  # fmt: skip
    with pytest.raises(ValueError, match="must divide the block mask's heads 3"):
        blockmask.group_lists(bm, 2)
    with pytest.raises(ValueError, match="block_mask has batch=1, heads=3"):
        fused_attention(*make_qkv(1, 32, 32, 4, 2, 16), scale=0.3, block_mask=bm, interpret=True)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_per_example_and_per_head_masks_lower_to_the_fused_kernels(platform):
    """A per-example document closure and a per-head window under GQA (dK/dV over pairs)."""
    x = jax.ShapeDtypeStruct((2, 1024, 4, 64), jnp.bfloat16)
    kx = jax.ShapeDtypeStruct((2, 1024, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

    def attn(q, k, seg):
        docs = lambda b, h, i, j: seg[b, i] == seg[b, j]  # noqa: E731
        heads = lambda b, h, i, j: jnp.abs(i - j) <= 128 * h + 100  # noqa: E731
        return ea.attention(q, k, k, method="blockwise", causal=True,
                            mask_mod=mods.and_masks(docs, heads))  # fmt: skip

    def loss(q, k, seg):
        return jnp.sum(attn(q, k, seg).astype(jnp.float32))

    assert _kernels(_lower(attn, (x, kx, seg), platform)) == {"forward"}
    assert _kernels(_lower(jax.grad(loss, (0, 1)), (x, kx, seg), platform)) == {
        "forward", "dkdv", "dq"}  # fmt: skip


def _union(bm):
    """``bm``'s tiles merged over batch and heads (visited by any, full if full for all)."""
    t = np.asarray(bm.tiles)
    visited, full = (t != blockmask.EMPTY).any((0, 1)), (t == blockmask.FULL).all((0, 1))
    tiles = np.where(full, blockmask.FULL, np.where(visited, blockmask.PARTIAL, blockmask.EMPTY))
    return blockmask.BlockMask.from_tiles(tiles[None, None].astype(np.int8),
                                          np.asarray(bm.visible).max((0, 1))[None, None],
                                          bm.mask_mod, bm.q_len, bm.kv_len, 16, 16)  # fmt: skip


def test_xla_engine_groups_equal_its_union_loops():
    """The XLA engine per group (Bm = 2, Hm = 4) and over the union (its shared loops): out,
    lse and gradients agree with a bias shared by the heads, dropout (drawn at global
    (b, h)), a learned ``score_mod`` array, ``kv_len`` and GQA."""
    q, k, v = make_qkv(2, 40, 45, 4, 2, 16, seed=25)
    mask_mod = _masks(40, 45)["heads"]
    own = engine.plan_block_mask(40, 45, batch=2, heads=4, causal=False, mask_mod=mask_mod,
                                 block_q=16, block_k=16)  # fmt: skip
    assert own.tiles.shape[:2] == (2, 4) and own_lists(own) and not own_lists(_union(own))
    stripes = blockmask.block_mask(lambda b, h, i, j: (i + j + h) % 2 == 0, 32, 32, heads=2,
                                   block_q=16, block_k=16)  # fmt: skip
    assert not own_lists(stripes)  # every tile partial for every head: nothing to save
    bias = jnp.asarray(np.random.default_rng(26).standard_normal((2, 1, 40, 45)), jnp.float32)
    slopes = jnp.asarray(mods.alibi_slopes(4))
    dout = np.random.default_rng(27).standard_normal(q.shape).astype(np.float32)

    def attn(bm, q, k, v, arrays):
        bias, slopes = arrays
        out, lse = engine.tiled_attention(
            q, k, v, scale=0.3, block_mask=bm, kv_len=jnp.asarray([45, 26]), bias=bias,
            score_mod=lambda s, b, h, i, j: s - slopes[h] * jnp.abs(i - j),
            dropout=masking.dropout(0.25, jax.random.key(3)),
        )  # fmt: skip
        return out + jnp.sin(jnp.where(jnp.isfinite(lse), lse, 0.0))[..., None]

    def grads(bm):
        out, vjp = jax.vjp(lambda *x: attn(bm, *x), q, k, v, (bias, slopes))
        return [out, *jax.tree.leaves(vjp(dout))]

    got, ref = jax.jit(lambda: (grads(own), grads(_union(own))))()
    for what, g, r in zip(("out", "dq", "dk", "dv", "dbias", "dslopes"), got, ref, strict=True):
        assert rel_err(g, r) < 1e-5, (what, rel_err(g, r))
