"""The drop-in's extra arguments on the tile engine: time ratios measured side by side in one run.

CPU, float32, B=1, 4 heads, head_dim 64, causal, ``ea.dot_product_attention``
with ``method="blockwise"``; forward and forward+backward. Each comparison is
compiled first, then timed in interleaved rounds (one call of each side per
round, after a warm-up round) so that load from other processes affects both
sides alike; figures are medians over rounds of the per-round ratio.

1. At 4k, against plain causal ``blockwise``: ``logits_soft_cap``, two
   documents as segment ids, ``sinks``, dropout (rate 0.1), and a dense bias
   ``[1, N, T, S]`` (and the compiled temporary memory of each, to show what
   the bias costs beyond its read).
2. 8 packed documents (segment ids) at 16k against causal ``blockwise``: the
   block mask built in every call from the ids, and built once and passed in
   (``block_mask=``, as a model shares it across its layers).

    python scripts/bench_dropin.py [--repeats 5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import efficient_attn as ea
from efficient_attn import bench

B, N, H = 1, 4, 64


def segment_ids(t: int, docs: int) -> jax.Array:
    return jnp.asarray((np.arange(t) * docs // t).astype(np.int32)[None])  # [1, T]


def variant(t: int, **kw):
    """(forward, forward+backward) of the drop-in with ``kw`` (arrays among them are inputs)."""
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array | ea.BlockMask)}
    static = {k: v for k, v in kw.items() if k not in arrays}

    def fwd(q, k, v, arrays):
        return ea.dot_product_attention(q, k, v, is_causal=True, **arrays, **static)

    def fwd_bwd(q, k, v, arrays):
        out, vjp = jax.vjp(fwd, q, k, v, arrays)
        return vjp(jnp.ones_like(out))

    return fwd, fwd_bwd, arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short-len", type=int, default=4096)
    parser.add_argument("--docs-len", type=int, default=16384)
    parser.add_argument("--out", default="experiments/results/cpu/dropin/bench_dropin.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    t = args.short_len
    q, k, v = bench.random_inputs(B, t, t, N, N, H)
    rng = np.random.default_rng(0)
    variants = {
        "plain causal": {},
        "logits_soft_cap=30": {"logits_soft_cap": 30.0},
        "2 documents (segment ids)": {"q_segment_ids": segment_ids(t, 2)},
        "sinks [N]": {"sinks": jnp.asarray(rng.standard_normal(N), jnp.float32)},
        "dropout 0.1": {"dropout_rate": 0.1, "dropout_rng": jax.random.PRNGKey(0)},
        "dense bias [1, N, T, S]": {
            "bias": jnp.asarray(rng.standard_normal((1, N, t, t)), jnp.float32)
        },
    }
    compiled, memory = {}, {}
    for name, kw in variants.items():
        fwd, fwd_bwd, arrays = variant(t, **kw)
        for mode, f in (("forward", fwd), ("forward+backward", fwd_bwd)):
            exe = bench.compiled(f, q, k, v, arrays)[0]
            compiled[name, mode] = (exe, (q, k, v, arrays))
            memory[name, mode] = bench.temp_bytes(exe)
    pairs = [
        (f"{name}, {mode}, {t // 1024}k", compiled[name, mode], compiled["plain causal", mode])
        for name in variants
        if name != "plain causal"
        for mode in ("forward", "forward+backward")
    ]
    td = args.docs_len
    qd, kd, vd = bench.random_inputs(B, td, td, N, N, H)
    # Segment ids (the block mask built in every call from the ids), then the same documents
    # with the block mask built once per step and passed in (a model shares it across layers).
    seg = segment_ids(td, 8)
    docs_mask = ea.mods.document_mask(seg) & ea.mods.causal_mask()
    block = jax.jit(
        lambda seg: ea.block_mask(docs_mask, td, td, batch=B, block_q=512, block_k=256)
    )(seg)
    plain = variant(td)
    for label, kw in (("8 documents", {"q_segment_ids": seg}),
                      ("8 documents, block_mask= built once", {"block_mask": block})):  # fmt: skip
        docs = variant(td, **kw)
        for i, mode in enumerate(("forward", "forward+backward")):
            pairs.append((
                f"{label} / causal, {mode}, {td // 1024}k",
                (bench.compiled(docs[i], qd, kd, vd, docs[2])[0], (qd, kd, vd, docs[2])),
                (bench.compiled(plain[i], qd, kd, vd, {})[0], (qd, kd, vd, {})),
            ))  # fmt: skip
    results = bench.interleaved_ratios(pairs, args.repeats)
    lines = [
        "# Drop-in arguments on the tile engine (`python scripts/bench_dropin.py`)",
        "",
        f"{bench.device_description()}, jax {jax.__version__}, float32, B={B}, {N} heads, "
        f"head_dim {H}, causal, `ea.dot_product_attention(method='blockwise')`; "
        f"{args.repeats} interleaved rounds, medians of per-round ratios (a / b, b = plain "
        f"causal); 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after.",
        "",
        "| comparison | ratio a / b | time a (ms) | time b (ms) |",
        "|---|---:|---:|---:|",
    ]
    for name, (ratio, ta, tb) in results.items():
        lines.append(f"| {name} | {ratio:.3f} | {ta * 1e3:,.1f} | {tb * 1e3:,.1f} |")
    bias_bytes = 4 * N * t * t
    lines += [
        "",
        f"Compiled temporary memory at {t // 1024}k (MiB; the dense bias itself is "
        f"{bias_bytes / 2**20:.0f} MiB, an input):",
        "",
        "| variant | forward | forward+backward |",
        "|---|---:|---:|",
    ]
    for name in variants:
        f, fb = memory[name, "forward"], memory[name, "forward+backward"]
        show = lambda x: "n/a" if x is None else f"{x / 2**20:,.1f}"  # noqa: E731
        lines.append(f"| {name} | {show(f)} | {show(fb)} |")
    bench.write_report(lines, args.out)


if __name__ == "__main__":
    main()
