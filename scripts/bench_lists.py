"""Per-example tile lists on the XLA engine: their time against the union's, side by side.

CPU, float32, B=4, 4 heads, head_dim 64, T=4096, ``blockwise`` (512 x 256 tiles),
causal packed documents with 4 documents per example at different boundaries.
"per-example": the block mask of ``document_mask`` (``Bm = 4``: each example runs
its own tiles); "union": the same mask with its tiles merged over the batch into
one shared classification (``Bm = 1``: a tile is visited if any example sees it
and full only if full for all), which is what the engine ran before. Forward and
forward + backward (``--heads``: also a causal window of 512 (h + 1) keys per head,
``Hm = 4``, against its union over the heads), timed in interleaved rounds after a warm-up
(:func:`efficient_attn.bench.interleaved_ratios`): medians over rounds.

``--hlo`` prints a hash of the compiled program of the shared (causal) case
instead: run it on two checkouts to check the shared-mask path is the same
program.

    python scripts/bench_lists.py [--repeats 5] [--heads] [--hlo]
"""

from __future__ import annotations

import argparse
import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np

import efficient_attn as ea
from efficient_attn import bench
from efficient_attn.core import blockmask, mods

B, N, H, T, DOCS = 4, 4, 64, 4096, 4


def segment_ids(seed: int = 0) -> np.ndarray:
    """``[B, T]``: DOCS packed documents per example, cut at random (different) places."""
    rng = np.random.default_rng(seed)
    cuts = [np.sort(rng.choice(np.arange(1, T), DOCS - 1, replace=False)) for _ in range(B)]
    return np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts]).astype(np.int32)


def union(bm: blockmask.BlockMask) -> blockmask.BlockMask:
    """``bm`` with its tiles merged over batch and heads: the lists the engine used to run."""
    t = np.asarray(bm.tiles)
    visited, full = (t != blockmask.EMPTY).any((0, 1)), (t == blockmask.FULL).all((0, 1))
    tiles = np.where(full, blockmask.FULL, np.where(visited, blockmask.PARTIAL, blockmask.EMPTY))
    visible = np.asarray(bm.visible).max((0, 1))
    return blockmask.BlockMask.from_tiles(tiles[None, None].astype(np.int8), visible[None, None],
                                          bm.mask_mod, bm.q_len, bm.kv_len, bm.block_q,
                                          bm.block_k)  # fmt: skip


def fns(bm):
    def fwd(q, k, v):
        return ea.attention(q, k, v, method="blockwise", implementation="xla", block_mask=bm)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda *x: jnp.sum(fwd(*x)), argnums=(0, 1, 2))(q, k, v)

    return fwd, fwd_bwd


def hlo_hash() -> str:
    q, k, v = bench.random_inputs(B, T, T, N, N, H)

    def causal(q, k, v):
        out = ea.attention(q, k, v, method="blockwise", implementation="xla", causal=True)
        return out, jax.grad(lambda q: jnp.sum(ea.attention(
            q, k, v, method="blockwise", implementation="xla", causal=True)))(q)  # fmt: skip

    text = jax.jit(causal).lower(q, k, v).compile().as_text()
    tables = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
    text = "\n\n".join(p for p in text.split("\n\n") if not p.startswith(tables))
    text = re.sub(r", metadata=\{[^}]*\}", "", text)  # source locations differ by checkout
    text = re.sub(r", stack_frame_id=\d+", "", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hlo", action="store_true")
    parser.add_argument("--heads", action="store_true", help="also a causal window per head")
    args = parser.parse_args()
    if args.hlo:
        print("shared causal program:", hlo_hash())
        return
    q, k, v = bench.random_inputs(B, T, T, N, N, H)
    masks = {"documents per example": (mods.document_mask(segment_ids()) & mods.causal_mask(),
                                       {"batch": B})}  # fmt: skip
    if args.heads:
        masks["window per head"] = (lambda b, h, i, j: (i >= j) & (i - j < 512 * (h + 1)),
                                    {"heads": N})  # fmt: skip
    pairs = []
    for name, (mask, dims) in masks.items():
        own = ea.block_mask(mask, T, T, block_q=512, block_k=256, **dims)
        merged = union(own)
        tiles = np.asarray(own.tiles)
        print(f"{name}: tiles per group {(tiles != 0).sum((2, 3)).ravel().tolist()} "
              f"(full {(tiles == 2).sum((2, 3)).ravel().tolist()}); union "
              f"{int((np.asarray(merged.tiles) != 0).sum())} (full "
              f"{int((np.asarray(merged.tiles) == 2).sum())}) of {tiles[0, 0].size}")  # fmt: skip
        for what, a, b in zip(("forward", "forward + backward"), fns(own), fns(merged),
                              strict=True):  # fmt: skip
            pairs.append((f"{name}, {what}", (bench.compiled(a, q, k, v)[0], (q, k, v)),
                          (bench.compiled(b, q, k, v)[0], (q, k, v))))  # fmt: skip
    for name, (ratio, ta, tb) in bench.interleaved_ratios(pairs, args.repeats).items():
        print(f"{name}: per-example {ta * 1e3:.0f} ms, union {tb * 1e3:.0f} ms, "
              f"ratio {ratio:.2f} (median of {args.repeats} interleaved rounds)")  # fmt: skip


if __name__ == "__main__":
    main()
