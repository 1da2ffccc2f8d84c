"""Block-sparse flash attention: online softmax over only the key tiles each query tile needs.

The execution engine of the sparse family (Child et al. 2019, "Generating Long
Sequences with Sparse Transformers"; Zaheer et al. 2020, "Big Bird"), written
like FlashAttention-2 (Dao 2023): queries are processed one tile at a time and
each query tile runs an online softmax over the key tiles listed for it in a
:class:`TileTable`; the backward pass is a ``custom_vjp`` that loops over key
tiles and, inside, over the query tiles that visit them (the transposed table),
recomputing probabilities from the saved log-sum-exp. Work is proportional to
the number of visited tiles and memory is O(N) in both passes.

A method describes its pattern with a :class:`Plan`:
  * ``table``: which key tiles each query tile visits (NumPy, built at trace
    time from static shapes and options);
  * ``rule``: inside a visited tile, which (query, key) pairs interact;
  * ``slot_pos``: the key position held by each key slot (keys may be
    gathered, e.g. summary columns appended after the regular keys).
Padding (tiles past the sequence end, ``kv_lengths``) is masked inside
boundary tiles, so any sequence length works.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import masking

#: ``rule(q_idx [bq, 1], k_pos [1, bk], slot [1, bk]) -> bool [bq, bk]``: which
#: pairs of a visited tile interact (query index, key position, key slot index;
#: padding rows have q_idx outside [0, Tq)). Must be hashable (a frozen dataclass).
Rule = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class TileTable:
    """Visited (query tile, key tile) pairs, as forward rows and backward columns.

    Attributes:
      rows: ``[nq, width]`` int32 key tiles of each query tile, ordered by
        ``first_key`` (padding entries are 0).
      row_counts: ``[nq]`` number of valid entries of each row.
      cols: ``[nk, width_t]`` int32 query tiles visiting each key tile, ascending.
      col_counts: ``[nk]``.
      first_key: ``[nk]`` smallest key position in each key tile; tiles at or
        past the longest ``kv_lengths`` are skipped.
    """

    rows: np.ndarray
    row_counts: np.ndarray
    cols: np.ndarray
    col_counts: np.ndarray
    first_key: np.ndarray

    @classmethod
    def from_pairs(
        cls, qi: np.ndarray, kj: np.ndarray, nq: int, nk: int, first_key: np.ndarray
    ) -> TileTable:
        """Table of the (deduplicated) pairs ``(qi[p], kj[p])``."""
        qi, kj = np.asarray(qi, np.int64), np.asarray(kj, np.int64)
        if qi.size and (qi.min() < 0 or qi.max() >= nq or kj.min() < 0 or kj.max() >= nk):
            raise ValueError(f"tile pairs out of range for {nq=}, {nk=}")
        flat = np.unique(qi * nk + kj)
        qi, kj = flat // nk, flat % nk
        first_key = np.asarray(first_key, np.int64)
        rows, row_counts = _pack(qi, kj, nq, order=np.lexsort((kj, first_key[kj], qi)))
        cols, col_counts = _pack(kj, qi, nk, order=np.lexsort((qi, kj)))
        return cls(rows, row_counts, cols, col_counts, first_key.astype(np.int32))

    @property
    def visited(self) -> int:
        """Number of visited (query tile, key tile) pairs."""
        return int(self.row_counts.sum())


def _pack(major: np.ndarray, minor: np.ndarray, n: int, order: np.ndarray):
    """Group ``minor`` by ``major`` in ``order``: ([n, width] int32, counts [n])."""
    major, minor = major[order], minor[order]
    counts = np.bincount(major, minlength=n).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    table = np.zeros((n, max(int(counts.max(initial=0)), 1)), np.int32)
    table[major, np.arange(major.size) - starts[major]] = minor
    return table, counts


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything static about one block-sparse call.

    Attributes:
      tq: number of queries.
      bq: query tile size; ``bk``: key tile size.
      q_left: zero query rows prepended so query tiles align with the pattern.
      slot_pos: ``[S]`` key position held by each key slot (-1: empty), ``S % bk == 0``.
      table: the visited tiles.
      rule: the in-tile pattern (see :data:`Rule`).
    """

    tq: int
    bq: int
    bk: int
    q_left: int
    slot_pos: np.ndarray
    table: TileTable
    rule: Rule

    @classmethod
    def build(
        cls,
        tq: int,
        bq: int,
        bk: int,
        slot_pos: np.ndarray,
        pairs: tuple[np.ndarray, np.ndarray],
        rule: Rule,
        q_left: int = 0,
    ) -> Plan:
        """Plan visiting the (query tile, key tile) ``pairs``."""
        nq, nk = masking.cdiv(q_left + tq, bq), slot_pos.size // bk
        table = TileTable.from_pairs(*pairs, nq, nk, first_keys(slot_pos, bk))
        return cls(tq, bq, bk, q_left, slot_pos, table, rule)

    @property
    def nq(self) -> int:
        return masking.cdiv(self.q_left + self.tq, self.bq)

    @property
    def nk(self) -> int:
        return self.slot_pos.size // self.bk


def first_keys(slot_pos: np.ndarray, bk: int) -> np.ndarray:
    """``[S // bk]`` smallest valid key position of each key tile (int32 max if none)."""
    big = np.iinfo(np.int32).max
    tiles = np.where(slot_pos >= 0, slot_pos, big).reshape(-1, bk)
    return tiles.min(axis=1)


def _gather_slots(x: jax.Array, slot_pos: np.ndarray) -> jax.Array:
    """[B, T, K, D] -> [B, S, K, D]: key slots, zero where ``slot_pos < 0``.

    A leading ``-1, .., -1, 0, 1, .., m-1`` run is built by padding, the rest by a gather.
    """
    lead = int(np.argmax(slot_pos >= 0)) if (slot_pos >= 0).any() else slot_pos.size
    same = slot_pos[lead:] == np.arange(slot_pos.size - lead)
    run = int(same.size if same.all() else np.argmin(same))
    rest = slot_pos[lead + run :]
    if not (rest >= 0).any():
        return jnp.pad(x[:, :run], ((0, 0), (lead, rest.size), (0, 0), (0, 0)))
    head = jnp.pad(x[:, :run], ((0, 0), (lead, 0), (0, 0), (0, 0)))
    tail = jnp.take(x, np.maximum(rest, 0), axis=1)
    tail = jnp.where((rest >= 0)[None, :, None, None], tail, 0)
    return jnp.concatenate([head, tail], axis=1)


@functools.partial(jax.jit, static_argnames=("plan",))
def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, scale: float, plan: Plan
) -> jax.Array:
    """Block-sparse attention.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv], kv_len: int [B]
    -> [B, Tq, N, Hv]. Rows that see no key are zero. Compiled once per
    ``plan`` object (plans are compared by identity: cache them).
    """
    kh = k.shape[2]
    rows = plan.nq * plan.bq
    qp = jnp.pad(q, ((0, 0), (plan.q_left, rows - plan.q_left - plan.tq), (0, 0), (0, 0)))
    ks, vs = _gather_slots(k, plan.slot_pos), _gather_slots(v, plan.slot_pos)
    static = _Static(plan.bq, plan.bk, plan.q_left, kh, plan.rule)
    t = plan.table
    arrays = tuple(
        jnp.asarray(a, jnp.int32)
        for a in (plan.slot_pos, t.rows, t.row_counts, t.cols, t.col_counts, t.first_key)
    )
    scale = jnp.asarray(scale, masking.stat_dtype(q.dtype))
    out = _block_sparse(qp, ks, vs, kv_len, scale, arrays, static)
    return out[:, plan.q_left : plan.q_left + plan.tq]


def plan_mask(plan: Plan, tq: int, tk: int, *, counts: bool = False) -> np.ndarray:
    """``[Tq, Tk]`` pairs the engine computes: the rule evaluated on every visited tile.

    With ``counts=True``, how many times each pair is computed (must be 0 or 1).
    """
    total = np.zeros((tq, tk), np.int64)
    t = plan.table
    for i in range(plan.nq):
        q_idx = i * plan.bq + np.arange(plan.bq)[:, None] - plan.q_left
        for j in t.rows[i, : t.row_counts[i]]:
            slot = j * plan.bk + np.arange(plan.bk)[None, :]
            k_pos = plan.slot_pos[slot]
            allowed = np.asarray(plan.rule(q_idx, k_pos, slot)) & (k_pos >= 0) & (k_pos < tk)
            allowed &= (q_idx >= 0) & (q_idx < tq)
            qi, si = np.nonzero(allowed)
            np.add.at(total, (q_idx[qi, 0], k_pos[0, si]), 1)
    return total if counts else total > 0


# ---- the custom_vjp core: q [B, R, N, H] with R % bq == 0, k/v slots [B, S, K, D] ----


@dataclasses.dataclass(frozen=True)
class _Static:
    bq: int
    bk: int
    q_left: int
    kv_heads: int
    rule: Rule

    def mask(self, i, j, slot_pos, kv_len):
        """Boolean [B, 1, 1, bq, bk] mask of query tile i against key tile j."""
        q_idx = i * self.bq + jnp.arange(self.bq)[:, None] - self.q_left
        slot = j * self.bk + jnp.arange(self.bk)[None, :]
        k_pos = jax.lax.dynamic_slice_in_dim(slot_pos, j * self.bk, self.bk)[None, :]
        ok = self.rule(q_idx, k_pos, slot) & (k_pos >= 0)
        return ok & (k_pos < kv_len[:, None, None, None, None])


def _q_tiles(x: jax.Array, kv_heads: int, bq: int) -> jax.Array:
    """[B, R, N, D] -> [nq, B, K, G, bq, D]."""
    x = masking.group_queries(x, kv_heads)
    b, r, k, g, d = x.shape
    return x.reshape(b, r // bq, bq, k, g, d).transpose(1, 0, 3, 4, 2, 5)


def _q_untiles(x: jax.Array) -> jax.Array:
    """[nq, B, K, G, bq, D] -> [B, R, N, D]."""
    nq, b, k, g, bq, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, k * g, d)


def _k_tiles(x: jax.Array, bk: int) -> jax.Array:
    """[B, S, K, D] -> [nk, B, K, bk, D]."""
    b, s, k, d = x.shape
    return x.reshape(b, s // bk, bk, k, d).transpose(1, 0, 3, 2, 4)


def _k_untiles(x: jax.Array) -> jax.Array:
    """[nk, B, K, bk, D] -> [B, S, K, D]."""
    nk, b, k, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, k, d)


def _forward(q, k, v, kv_len, scale, arrays, st: _Static):
    """Online softmax over visited tiles: (out [B, R, N, Hv], lse [nq, B, K, G, bq])."""
    slot_pos, rows, row_counts, _, _, first_key = arrays
    acc = masking.stat_dtype(q.dtype)
    qb = _q_tiles(q, st.kv_heads, st.bq)
    kb, vb = _k_tiles(k, st.bk), _k_tiles(v, st.bk)
    max_len = jnp.max(kv_len)

    def q_tile(args):
        i, q_i, row, count = args  # q_i: [B, K, G, bq, H]; row: [width]
        live = (jnp.arange(row.shape[0]) < count) & (first_key[row] < max_len)
        stats_shape = q_i.shape[:-1]

        def kv_step(t, carry):
            o, m, l = carry
            j = row[t]
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, kb[j], preferred_element_type=acc)
            s = jnp.where(st.mask(i, j, slot_pos, kv_len), s * scale, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum(
                "bkgqs,bksd->bkgqd", p.astype(v.dtype), vb[j], preferred_element_type=acc
            )
            return o * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)

        init = (
            jnp.zeros((*stats_shape, v.shape[-1]), acc),
            jnp.full(stats_shape, -jnp.inf, acc),
            jnp.zeros(stats_shape, acc),
        )
        o, m, l = jax.lax.fori_loop(0, jnp.sum(live), kv_step, init)
        nonempty = l > 0
        out = o / jnp.where(nonempty, l, 1.0)[..., None]
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
        return out.astype(q.dtype), lse

    nq = qb.shape[0]
    out_b, lse = jax.lax.map(q_tile, (jnp.arange(nq), qb, rows, row_counts))
    return _q_untiles(out_b), lse


def _backward(q, k, v, kv_len, scale, arrays, out, lse, dout, st: _Static):
    """Recompute visited tiles from ``lse``; dK/dV per key tile, dQ in one O(N) buffer."""
    slot_pos, _, _, cols, col_counts, first_key = arrays
    acc = masking.stat_dtype(q.dtype)
    qb, dob = _q_tiles(q, st.kv_heads, st.bq), _q_tiles(dout.astype(q.dtype), st.kv_heads, st.bq)
    delta = jnp.sum(_q_tiles(out, st.kv_heads, st.bq).astype(acc) * dob.astype(acc), axis=-1)
    kb, vb = _k_tiles(k, st.bk), _k_tiles(v, st.bk)
    max_len = jnp.max(kv_len)

    def kv_tile(dq, args):
        j, k_j, v_j, col, count = args  # k_j: [B, K, bk, H]; col: [width_t]

        def q_step(t, carry):
            dk, dv, dq = carry
            i = col[t]
            q_i, do_i = qb[i], dob[i]
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=acc)
            mask = st.mask(i, j, slot_pos, kv_len)
            p = jnp.where(mask, jnp.exp(s * scale - lse[i][..., None]), 0.0)
            dv = dv + jnp.einsum(
                "bkgqs,bkgqd->bksd", p.astype(v.dtype), do_i, preferred_element_type=acc
            )
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=acc)
            ds = (p * (dp - delta[i][..., None])).astype(q.dtype)
            dq = dq.at[i].add(jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=acc))
            dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=acc)
            return dk, dv, dq

        init = (jnp.zeros(k_j.shape, acc), jnp.zeros(v_j.shape, acc), dq)
        n = jnp.where(first_key[j] < max_len, count, 0)
        dk, dv, dq = jax.lax.fori_loop(0, n, q_step, init)
        return dq, (dk, dv)

    nk = kb.shape[0]
    dq_raw, (dk_raw, dv) = jax.lax.scan(
        kv_tile, jnp.zeros(qb.shape, acc), (jnp.arange(nk), kb, vb, cols, col_counts)
    )
    dscale = jnp.sum(dq_raw * qb.astype(acc))
    dq = _q_untiles(dq_raw * scale).astype(q.dtype)
    dk = _k_untiles(dk_raw * scale).astype(k.dtype)
    return dq, dk, _k_untiles(dv).astype(v.dtype), dscale


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _block_sparse(q, k, v, kv_len, scale, arrays, st):
    return _forward(q, k, v, kv_len, scale, arrays, st)[0]


def _block_sparse_fwd(q, k, v, kv_len, scale, arrays, st):
    out, lse = _forward(q, k, v, kv_len, scale, arrays, st)
    return out, (q, k, v, kv_len, scale, arrays, out, lse)


def _block_sparse_bwd(st, res, dout):
    q, k, v, kv_len, scale, arrays, out, lse = res
    dq, dk, dv, dscale = _backward(q, k, v, kv_len, scale, arrays, out, lse, dout, st)
    dscale = jnp.asarray(dscale, scale.dtype).reshape(scale.shape)
    return dq, dk, dv, None, dscale, tuple(None for _ in arrays)


_block_sparse.defvjp(_block_sparse_fwd, _block_sparse_bwd)
