"""mask_mod / score_mod / block masks (FlexAttention's programming model) on the tile engine.

Every library mod, combinations and inline lambdas are checked against a
float64 reference that materialises the mask and the score (jnp under x64,
so gradients of q, k, v and of captured arrays come from autodiff of the
plain formula); block masks against the dense masks they classify.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.core import mods
from tests.conftest import make_qkv, rel_err

F32_TOL = 2e-5


def reference64(q, k, v, *, mask_mod=None, score_mod=None, causal=False, kv_lengths=None, scale):
    """Float64 softmax attention with the mods evaluated on the whole ``[Tq, Tk]`` matrix."""
    b, tq, n, _ = q.shape
    tk, kh = k.shape[1], k.shape[2]
    g = n // kh
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, kr) * scale
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(n)[None, :, None, None]
    qi = jnp.arange(tq)[None, None, :, None]
    ki = jnp.arange(tk)[None, None, None, :]
    if score_mod is not None:
        s = score_mod(s, bi, hi, qi, ki)
    mask = jnp.ones((b, n, tq, tk), bool)
    if mask_mod is not None:
        mask = mask & mask_mod(bi, hi, qi, ki)
    if causal:
        mask = mask & (ki <= qi + tk - tq)
    if kv_lengths is not None:
        mask = mask & (ki < jnp.asarray(kv_lengths)[:, None, None, None])
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    w = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-300)
    return jnp.einsum("bnqk,bknd->bqnd", w, vr)


def segments(b, t, docs, seed=0):
    """Random packed-document segment ids ``[B, T]`` (sorted, ``docs`` documents)."""
    rng = np.random.default_rng(seed)
    cuts = [np.sort(rng.choice(np.arange(1, t), size=docs - 1, replace=False)) for _ in range(b)]
    return np.stack([np.searchsorted(c, np.arange(t), side="right") for c in cuts]).astype(np.int32)


T = 63
SEG = segments(2, T, 4)
SLOPES = mods.alibi_slopes(4)
TABLE = np.random.default_rng(5).standard_normal((4, 2 * 8 + 1)).astype(np.float32)

#: (name, mask_mod or None, score_mod or None): mods that index only positions, or arrays.
MODS = [
    ("causal-offset", mods.causal_mask(-3), None),
    ("window", mods.sliding_window(7, 2), None),
    ("chunked-causal", mods.chunked_mask(16) & mods.causal_mask(), None),
    ("prefix-lm", mods.prefix_lm(20), None),
    ("prefix-per-example", mods.prefix_lm(np.array([5, 40])), None),
    ("documents-causal", mods.document_mask(SEG) & mods.causal_mask(), None),
    ("dilated", mods.dilated_window(4, 3), None),
    ("strided-or-window", mods.or_masks(mods.strided_summary(8), mods.sliding_window(4)), None),
    ("bigbird", mods.bigbird_mask(T, T, block=8, num_random_blocks=1), None),
    ("alibi", None, mods.alibi(SLOPES)),
    ("soft-cap", None, mods.soft_cap(2.0)),
    ("relative-bias", None, mods.relative_position_bias(TABLE)),
    ("lambda-window+cap", lambda b, h, q, k: jnp.abs(q - k) < 9, mods.soft_cap(1.5)),
    ("lambda-head-mask", lambda b, h, q, k: (k % 4 != h) | (q == k), None),
    ("lambda-score", None, lambda s, b, h, q, k: s + 0.1 * jnp.sin(q - k).astype(s.dtype)),
]


def _attend(q, k, v, method="blockwise", **kw):
    return ea.attention(q, k, v, method=method, block_q=16, block_k=16, **kw)


#: Mods whose machinery another case already covers: run with -m slow.
_SLOW_MODS = {"causal-offset", "chunked-causal", "prefix-lm", "dilated", "lambda-score"}


@pytest.mark.parametrize(
    "name,mask_mod,score_mod",
    [pytest.param(*m, marks=[pytest.mark.slow] if m[0] in _SLOW_MODS else []) for m in MODS],
    ids=[m[0] for m in MODS],
)
def test_library_mods_match_float64_reference(name, mask_mod, score_mod):
    q, k, v = make_qkv(2, T, T, 4, 2, 8, seed=1)
    lengths = np.array([T, 50])
    kw = {"mask_mod": mask_mod, "score_mod": score_mod, "kv_lengths": lengths, "scale": 0.4}
    dout = np.random.default_rng(3).standard_normal(q.shape).astype(np.float32)

    @jax.jit
    def fast(q, k, v):
        out, vjp = jax.vjp(lambda *x: _attend(*x, **kw), q, k, v)
        return (out, *vjp(dout))

    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        out, vjp = jax.vjp(lambda *x: reference64(*x, **kw), *x64)
        refs = [np.asarray(r) for r in (out, *vjp(jnp.asarray(dout, jnp.float64)))]
    for what, got, ref in zip(("out", "dq", "dk", "dv"), fast(q, k, v), refs, strict=True):
        assert rel_err(got, ref) < F32_TOL, (name, what, rel_err(got, ref))


CASES = [  # (Tq, Tk, N, K, causal, kv_lengths, blocks)
    pytest.param(1, 1, 2, 1, True, None, (16, 16), id="T1-mqa-causal"),
    pytest.param(63, 40, 4, 2, True, (40, 7), (16, 8), id="Tq63-Tk40-gqa-causal-pad"),
    pytest.param(30, 77, 2, 2, False, (77, 1), (8, 32), id="Tq30-Tk77-pad"),
    pytest.param(
        1000,
        1000,
        2,
        1,
        True,
        (1000, 555),
        (128, 64),
        id="T1000-mqa-causal-pad",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("tq,tk,n,kh,causal,lengths,blocks", CASES)
def test_window_and_alibi_with_awkward_shapes(tq, tk, n, kh, causal, lengths, blocks):
    q, k, v = make_qkv(2, tq, tk, n, kh, 8, seed=2)
    mask = mods.sliding_window(100, 3, offset=tk - tq)
    score = mods.alibi(mods.alibi_slopes(n), offset=tk - tq)
    lengths = None if lengths is None else np.array(lengths)
    kw = {"mask_mod": mask, "score_mod": score, "causal": causal, "kv_lengths": lengths}
    out = ea.attention(q, k, v, method="blockwise", block_q=blocks[0], block_k=blocks[1], **kw)
    with jax.enable_x64(True):
        x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        ref = np.asarray(reference64(*x64, scale=8**-0.5, **kw))
    assert rel_err(out, ref) < F32_TOL


@pytest.mark.parametrize("method", ["additive", "local", "bigbird"])
def test_other_methods_accept_mods(method):
    q, k, v = make_qkv(1, 40, 40, 2, 2, 8, seed=4)
    arrays = ea.init_arrays(method, jax.random.key(0), 8)
    kw = {"mask_mod": mods.document_mask(segments(1, 40, 3)), "score_mod": mods.soft_cap(3.0)}
    plain = {"mask_mod": None, "score_mod": None}
    if method in ("dense", "local", "bigbird"):
        extra = {"local": {"window": 9}, "bigbird": {"block": 8}}.get(method, {})
        got = ea.attention(q, k, v, method=method, causal=True, **kw, **extra)
        w = ea.attention_weights(q, k, method=method, causal=True, **kw, **extra)
        np.testing.assert_allclose(got, np.einsum("bnqk,bknd->bqnd", w, v), rtol=2e-5, atol=2e-6)
        if method == "dense":
            ref = _attend(q, k, v, causal=True, **kw)
            assert rel_err(got, ref) < F32_TOL
        return
    got = ea.attention(q, k, v, method=method, causal=True, **kw, **arrays)
    w = ea.attention_weights(q, k, method=method, causal=True, **kw, **arrays)
    np.testing.assert_allclose(got, np.einsum("bnqk,bknd->bqnd", w, v), rtol=2e-5, atol=2e-6)
    assert rel_err(got, ea.attention(q, k, v, method=method, causal=True, **plain, **arrays)) > 1e-3


def test_gradients_reach_captured_arrays():
    """Learned ALiBi slopes and a relative-position table get autodiff-equal gradients."""
    q, k, v = make_qkv(1, 50, 50, 4, 4, 8, seed=6)
    slopes, table = jnp.asarray(SLOPES), jnp.asarray(TABLE)

    def loss(slopes, table, method):
        score = mods.chain_scores(mods.alibi(slopes), mods.relative_position_bias(table))
        out = ea.attention(q, k, v, method=method, causal=True, score_mod=score)
        return jnp.sum(jnp.sin(out))

    def closure_loss(slopes, method):  # a plain lambda closing over a traced array
        score = lambda s, b, h, qi, ki: s - slopes[h] * jnp.abs(qi - ki)  # noqa: E731
        return jnp.sum(jnp.sin(ea.attention(q, k, v, method=method, score_mod=score)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    fast, ref = grads(slopes, table, "blockwise"), grads(slopes, table, "dense")
    for f, r in zip(fast, ref, strict=True):
        assert np.abs(np.asarray(r)).max() > 0
        assert rel_err(f, r) < 1e-4
    g = jax.grad(closure_loss)
    assert rel_err(g(slopes, "blockwise"), g(slopes, "dense")) < 1e-4


@pytest.mark.slow  # the conformance suite checks bf16 of every exact method by default
def test_bf16_within_twice_dense_bf16_error():
    q, k, v = make_qkv(1, 200, 200, 4, 2, 32, seed=7)
    kw = {"mask_mod": mods.document_mask(segments(1, 200, 5)), "score_mod": mods.soft_cap(4.0)}
    with jax.enable_x64(True):
        ref = np.asarray(reference64(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)),
                                     causal=True, scale=32**-0.5, **kw))  # fmt: skip
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    fast = ea.attention(qb, kb, vb, method="blockwise", causal=True, **kw)
    dense = ea.attention(qb, kb, vb, method="dense", causal=True, **kw)
    assert fast.dtype == jnp.bfloat16
    assert (
        rel_err(np.asarray(fast, np.float32), ref)
        <= 2 * rel_err(np.asarray(dense, np.float32), ref) + 1e-3
    )


# ---- block masks ----------------------------------------------------------------


@pytest.mark.parametrize("name,mask_mod,score_mod", [m for m in MODS if m[1] is not None][:9],
                         ids=[m[0] for m in MODS if m[1] is not None][:9])  # fmt: skip
def test_block_mask_classification_against_dense_mask(name, mask_mod, score_mod):
    bm = ea.block_mask(mask_mod, T, T + 5, batch=2, heads=4, block_q=16, block_k=8)
    dense = bm.dense()  # [B, N, Tq, Tk]
    tiles = np.repeat(np.repeat(bm.tiles, 16, 2), 8, 3)[:, :, :T, : T + 5]
    assert not (dense & (tiles == 0)).any()  # no visible pair is skipped
    assert dense[tiles == 2].all()  # every full tile is truly full
    assert ((tiles == 1) <= True).all()
    for b in range(2):  # partial tiles hold both kinds of pairs
        for h in range(4):
            for i, j in zip(*np.nonzero(bm.tiles[b, h] == 1), strict=True):
                block = dense[b, h, i * 16 : (i + 1) * 16, j * 8 : (j + 1) * 8]
                assert block.any() and (not block.all() or block.shape != (16, 8))
    np.testing.assert_array_equal(bm.visible.sum((2, 3)), dense.sum((2, 3)))


def _runs_and_pairwise(mask, q_pos, k_pos, q_limit, k_limit, bm, bq, bk):
    """Tile classes and visible counts of ``mask`` from its runs (with their ``ok``) and from
    evaluating every pair, at explicit ascending positions (padded to the tiles)."""
    from efficient_attn.core.blockmask import hoist
    from efficient_attn.core.blockmask.classify import _classify, _from_runs, _index_args, _runs

    def pad(p, block, limit):
        return np.concatenate([p, np.full(-len(p) % block, limit)]).astype(np.int32)

    qp, kp = pad(q_pos, bq, q_limit), pad(k_pos, bk, k_limit)

    def both():
        h = hoist("mask_mod", mask, *_index_args(bm, 1, bq, kp.size))
        lo, hi, exact = _runs(mask, qp, kp, q_limit, k_limit, bm, 1)
        qj, kj = jnp.asarray(qp), jnp.asarray(kp)
        tiles, visible, monotone = _from_runs(lo, hi, qj, kj, q_limit, k_limit, bm, 1, bq, bk)
        pair = _classify(h.fn, h.consts, qj, kj, q_limit, k_limit, bm, 1, bq, bk)
        return (tiles, visible), exact & monotone, pair

    return jax.jit(both)()


class _Band(mods.Mask):
    """A user's mask with the runs hook: keys within ``width`` before the query, by the
    query's lane (``lane[b] = 1`` doubles the width)."""

    def __init__(self, lane, width):
        self.lane, self.width = lane, width

    def __call__(self, b, h, q_idx, kv_idx):
        w = self.width * (1 + self.lane[b])
        return (kv_idx <= q_idx) & (kv_idx > q_idx - w)

    def row_intervals(self, b, h, q_idx, kv_idx):  # keys (q - w, q]: a run per row
        w = self.width * (1 + self.lane[b])  # [Bm]
        lo = jnp.searchsorted(kv_idx, q_idx[None, :] - w[:, None], side="right")  # [Bm, Tq]
        return lo[:, None, :], jnp.searchsorted(kv_idx, q_idx, side="right"), True


def test_data_masks_from_runs_equal_the_pairwise_classification():
    """Documents (sorted ids, also cross attention with ids missing on one side), per-example
    prefixes, their ``&`` with causal/window/chunks, at gapped positions (ring shards,
    gathered keys) and a user's ``row_intervals`` hook: tile classes and visible counts from
    runs equal those of every pair; unsorted ids report ``ok`` False and the block mask
    falls back to evaluating every pair (same result)."""
    rng = np.random.default_rng(3)
    q_ids = np.sort(rng.choice([0, 1, 2, 4, 6], (2, 60)), 1).astype(np.int32)
    kv_ids = np.sort(rng.choice([0, 2, 3, 4, 5], (2, 60)), 1).astype(np.int32)
    docs = mods.document_mask(q_ids, kv_ids)
    zigzag = np.r_[0:11, 49:60]  # a ring shard's positions
    gathered = np.sort(rng.choice(60, 23, replace=False))
    cases = [
        (docs, np.arange(37), np.arange(29), 5, 3),
        (docs & mods.causal_mask(-8), np.arange(37), np.arange(29), 4, 4),
        (mods.document_mask(q_ids) & mods.sliding_window(4, 1), zigzag, gathered, 4, 6),
        (mods.prefix_lm(np.array([3, 17])) & mods.chunked_mask(7), gathered, zigzag, 3, 5),
        (mods.prefix_lm(np.array([3, 17])) & mods.causal_mask(), np.arange(60), zigzag, 8, 4),
        (_Band(jnp.array([0, 1]), 5), np.arange(41), np.arange(41), 8, 4),
    ]
    for mask, q_pos, k_pos, bq, bk in cases:
        runs, ok, pair = _runs_and_pairwise(mask, q_pos, k_pos, 60, 60, 2, bq, bk)
        assert bool(ok), mask
        for got, want in zip(runs, pair, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(mask))
    unsorted = mods.document_mask(rng.integers(0, 3, (2, 60)).astype(np.int32))
    _, ok, pair = _runs_and_pairwise(unsorted, np.arange(60), np.arange(60), 60, 60, 2, 8, 8)
    assert not bool(ok)
    bm = jax.jit(lambda m: ea.block_mask(m, 60, 60, batch=2, block_q=8, block_k=8))(unsorted)
    np.testing.assert_array_equal(np.asarray(bm.tiles), np.asarray(pair[0]))
    np.testing.assert_array_equal(np.asarray(bm.visible), np.asarray(pair[1]))


def test_block_mask_lists_transpose_and_density():
    bm = ea.block_mask(mods.sliding_window(40), 300, 300, block_q=32, block_k=64)
    tiles = bm.tiles[0, 0]
    for i in range(tiles.shape[0]):
        assert list(bm.kv_indices[0, 0, i, : bm.kv_num[0, 0, i]]) == list(
            np.nonzero(tiles[i] == 1)[0]
        )
        assert list(bm.full_kv_indices[0, 0, i, : bm.full_kv_num[0, 0, i]]) == list(
            np.nonzero(tiles[i] == 2)[0]
        )
    for j in range(tiles.shape[1]):
        assert list(bm.q_indices[0, 0, j, : bm.q_num[0, 0, j]]) == list(
            np.nonzero(tiles[:, j] == 1)[0]
        )
    assert 0 < bm.pair_density < bm.density < 1
    assert bm.computed_pairs == int((tiles != 0).sum()) * 32 * 64
    assert "+" in bm.to_string() and "BlockMask(" in repr(bm)


def test_static_block_masks_are_cached_and_independent_of_batch():
    a = ea.block_mask(mods.causal_mask(), 512, 512)
    assert a.static and a.tiles.shape == (1, 1, 4, 4)
    assert ea.block_mask(mods.causal_mask(), 512, 512) is a  # equal mods hit the cache
    with pytest.raises(ValueError, match="reads its batch index 'b' but batch=None"):
        ea.block_mask(mods.document_mask(SEG), T, T)


def test_data_masks_under_jit_never_retrace():
    traces = []
    q, k, v = make_qkv(2, T, T, 4, 2, 8, seed=8)

    @jax.jit
    def f(seg, q, k, v):
        traces.append(1)
        mask = mods.document_mask(seg) & mods.causal_mask()
        bm = ea.block_mask(mask, T, T, batch=2, block_q=16, block_k=16)
        assert not bm.static
        return ea.attention(q, k, v, method="blockwise", block_mask=bm), bm

    for seed in range(3):
        seg = segments(2, T, 3 + seed, seed=seed)
        out, bm = f(seg, q, k, v)  # a BlockMask is returned from jit (a pytree)
        assert isinstance(bm, ea.BlockMask)
        ref = _attend(q, k, v, mask_mod=mods.document_mask(seg) & mods.causal_mask())
        assert rel_err(out, ref) < F32_TOL
    assert len(traces) == 1


def test_block_mask_reused_and_passed_into_jit():
    q, k, v = make_qkv(1, 100, 100, 2, 2, 8, seed=9)
    bm = ea.block_mask(mods.sliding_window(10, 10), 100, 100, block_q=32, block_k=32)
    f = jax.jit(lambda bm, q: ea.attention(q, k, v, method="blockwise", block_mask=bm))
    ref = _attend(q, k, v, mask_mod=mods.sliding_window(10, 10))
    assert rel_err(f(bm, q), ref) < F32_TOL  # a static block mask traced as data still works
    with_causal = ea.attention(q, k, v, method="blockwise", causal=True, block_mask=bm)
    assert rel_err(with_causal, _attend(q, k, v, causal=True, mask_mod=bm.mask_mod)) < F32_TOL


def test_nan_padding_never_leaks():
    q, k, v = make_qkv(2, 40, 40, 2, 2, 8, seed=10)
    k, v = k.copy(), v.copy()
    lengths = np.array([25, 40])
    k[0, 25:], v[0, 25:] = np.nan, np.nan
    kw = {"mask_mod": mods.sliding_window(12, 12), "score_mod": mods.soft_cap(2.0),
          "kv_lengths": lengths}  # fmt: skip

    def loss(q, k, v):
        return jnp.sum(_attend(q, k, v, **kw))

    out = _attend(q, k, v, **kw)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    for g in grads:  # padding keys get zero gradients, never NaN
        assert np.isfinite(np.asarray(g)).all()
    assert (np.asarray(grads[1])[0, 25:] == 0).all()


def test_empty_rows_are_zero_with_finite_gradients():
    q, k, v = make_qkv(1, 20, 20, 2, 2, 8)
    mask = lambda b, h, qi, ki: (qi >= 10) & (ki <= qi)  # noqa: E731  rows 0..9 see nothing
    out = _attend(q, k, v, mask_mod=mask)
    assert (np.asarray(out)[:, :10] == 0).all()
    g = jax.grad(lambda q: jnp.sum(_attend(q, k, v, mask_mod=mask)))(q)
    assert np.isfinite(np.asarray(g)).all()


# ---- bad input ------------------------------------------------------------------


def test_bad_mods_and_block_masks_raise():
    q, k, v = make_qkv(1, 20, 20, 2, 2, 8)
    with pytest.raises(ValueError, match="mask_mod must return a boolean array"):
        _attend(q, k, v, mask_mod=lambda b, h, qi, ki: qi - ki)
    with pytest.raises(ValueError, match="score_mod must return an array of score's shape"):
        _attend(q, k, v, score_mod=lambda s, b, h, qi, ki: s.sum())
    with pytest.raises(ValueError, match="score_mod must return an array of score's shape"):
        _attend(q, k, v, score_mod=lambda s, b, h, qi, ki: s.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"does not accept mask_mod; methods that do: .*blockwise"):
        ea.attention(q, k, v, method="linear_elu", mask_mod=mods.causal_mask())
    with pytest.raises(ValueError, match="does not accept score_mod"):
        ea.attention(q, k, v, method="xla", score_mod=mods.soft_cap(1.0))
    with pytest.raises(ValueError, match="mask_mod must be a callable"):
        _attend(q, k, v, mask_mod=3)
    bm = ea.block_mask(mods.causal_mask(), 20, 24)
    with pytest.raises(ValueError, match="block_mask was built for q_len=20, kv_len=24"):
        ea.attention(q, k, v, method="blockwise", block_mask=bm)
    bm = ea.block_mask(mods.causal_mask(), 20, 20, block_q=8, block_k=8)
    with pytest.raises(ValueError, match="block_q=16 disagrees with block_mask's block_q=8"):
        ea.attention(q, k, v, method="blockwise", block_mask=bm, block_q=16)
    with pytest.raises(ValueError, match="mask_mod differs from the mask_mod block_mask"):
        ea.attention(q, k, v, method="blockwise", block_mask=bm, mask_mod=mods.sliding_window(2))
    with pytest.raises(ValueError, match="builds its block mask from its own pattern"):
        ea.attention(q, k, v, method="local", block_mask=bm)
    with pytest.raises(ValueError, match=r"block_mask must be an ea\.BlockMask"):
        ea.attention(q, k, v, method="blockwise", block_mask=np.ones((20, 20), bool))
    with pytest.raises(ValueError, match="segment"):
        mods.document_mask(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="cap=0"):
        mods.soft_cap(0)
