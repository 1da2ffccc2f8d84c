"""BigBird's block pattern as a mask mod (Zaheer et al. 2020): sliding, global and random blocks."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from efficient_attn.core.mods.base import Mask, _int, _pytree


def bigbird_blocks(
    nb: int, *, causal: bool, num_global_blocks: int, num_random_blocks: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(is_global [nb], key blocks of each query block) of BigBird's block pattern.

    Global blocks: the first ``ceil(g/2)`` and last ``floor(g/2)`` blocks (causal:
    the first ``g``); they attend to and are attended by every block. Every
    other query block sees its neighbours ``b-1, b, b+1`` (causal: ``b-1, b``),
    the global blocks, and ``num_random_blocks`` other blocks drawn without
    replacement from the rest (causal: only from earlier blocks) by
    ``np.random.default_rng(seed)``.
    """
    g, r = num_global_blocks, num_random_blocks
    if causal:
        glob = np.arange(min(g, nb))
    else:
        glob = np.union1d(np.arange(min((g + 1) // 2, nb)), np.arange(max(nb - g // 2, 0), nb))
    is_global = np.zeros(nb, bool)
    is_global[glob] = True
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(nb):
        if is_global[b]:
            rows.append(np.arange(b + 1 if causal else nb))
            continue
        limit = b if causal else nb  # random blocks come from [0, limit)
        near = np.arange(max(b - 1, 0), min(b + (1 if causal else 2), nb))
        fixed = np.union1d(near, glob[glob < limit] if causal else glob)
        taken = fixed[fixed < limit]
        count = min(r, limit - taken.size)
        extra = rng.choice(limit - taken.size, size=count, replace=False) if count else []
        extra = np.sort(np.asarray(extra, np.int64))
        for f in taken:  # index among the free blocks -> block number
            extra = extra + (extra >= f)
        rows.append(np.union1d(fixed, extra))
    return is_global, rows


@functools.lru_cache(maxsize=32)
def _bigbird_table(nb: int, causal: bool, g: int, r: int, seed: int) -> np.ndarray:
    _, rows = bigbird_blocks(nb, causal=causal, num_global_blocks=g, num_random_blocks=r, seed=seed)
    table = np.zeros((nb, nb), bool)
    for i, row in enumerate(rows):
        table[i, row] = True
    table.setflags(write=False)
    return table


@_pytree()
@dataclasses.dataclass(frozen=True)
class BigBird(Mask):
    """BigBird's block pattern of length ``max(Tq, Tk)``, bottom-right aligned."""

    q_len: int
    kv_len: int
    block: int
    causal: bool
    num_global_blocks: int
    num_random_blocks: int
    seed: int

    def __call__(self, b, h, q_idx, kv_idx):
        length = max(self.q_len, self.kv_len)
        nb = -(-length // self.block)
        table = _bigbird_table(
            nb, self.causal, self.num_global_blocks, self.num_random_blocks, self.seed
        )
        xp = np if isinstance(q_idx, np.ndarray) and isinstance(kv_idx, np.ndarray) else jnp
        qb = (q_idx + (length - self.q_len)) // self.block
        kb = (kv_idx + (length - self.kv_len)) // self.block
        return xp.asarray(table)[xp.clip(qb, 0, nb - 1), xp.clip(kb, 0, nb - 1)]

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        length = max(self.q_len, self.kv_len)
        nb = -(-length // self.block)
        table = _bigbird_table(
            nb, self.causal, self.num_global_blocks, self.num_random_blocks, self.seed
        )

        def blocks(lo, hi, shift):
            lo = np.clip((lo + shift) // self.block, 0, nb - 1)
            return lo, lo == np.clip((hi + shift) // self.block, 0, nb - 1)

        (qb, q_one), (kb, k_one) = (
            blocks(q_lo, q_hi, length - self.q_len),
            blocks(k_lo, k_hi, length - self.kv_len),
        )
        one = q_one & k_one  # the tile lies inside one block pair: exact
        hit = table[qb, kb]
        return hit | ~one, hit & one


def bigbird_mask(
    q_len: int,
    kv_len: int,
    *,
    block: int = 64,
    causal: bool = False,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    seed: int = 0,
) -> BigBird:
    """BigBird (Zaheer et al. 2020): sliding, global and random blocks of ``block`` positions.

    See :func:`bigbird_blocks` for the block
    pattern; ``causal`` draws the causal variant of it (combine with the causal
    rule for causal attention).
    """
    return BigBird(
        _int("q_len", q_len, 1), _int("kv_len", kv_len, 1), _int("block", block, 1),
        bool(causal), _int("num_global_blocks", num_global_blocks),
        _int("num_random_blocks", num_random_blocks), _int("seed", seed),
    )  # fmt: skip
