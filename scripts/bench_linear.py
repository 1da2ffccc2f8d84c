"""Linear attention family vs XLA's exact attention: time, compiled memory, scaling, error.

Issue 4's benchmark, one run, side by side: B=1, 4 heads, head_dim 64, float32,
causal. Prints markdown tables:

1. time of forward and forward+backward at N=8192 and compiled temporary
   memory of forward+backward, each against ``jax.nn.dot_product_attention``
   (the ``xla`` method);
2. t(32768)/t(8192) and the scaling exponent fitted over N in {2048, 8192, 32768};
3. approximation error at N=1024 against the float64 NumPy reference
   (relative Frobenius error of the output and of dq, dk, dv), on random
   normal inputs and on inputs with q, k halved (FAVOR+'s variance grows like
   ``exp(|x + y|^2)``, so Performer is accurate only for small q, k norms).

Targets (linear_elu and performer): time at 8192 <= 0.1x XLA's, temporary
memory <= 0.05x XLA's, t(32768)/t(8192) <= 4**1.2.

    python scripts/bench_linear.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import efficient_attn as ea
from efficient_attn import bench

LINEAR = ("linear_elu", "linear_relu", "linear_softmax", "performer")
TARGETS = ("linear_elu", "performer")
BATCH, HEADS, HEAD_DIM = 1, 4, 64
MAIN_LEN, SCALING_LENS, ERROR_LEN = 8192, (2048, 8192, 32768), 1024


def timings(method: str, n: int, repeats: int) -> dict[str, bench.Timing]:
    """Forward and forward+backward timings of ``method``, causal, at length ``n``."""
    args = bench.random_inputs(BATCH, n, n, HEADS, HEADS, HEAD_DIM, jnp.float32)
    return {
        mode: bench.measure(
            bench.attention_fn(method, causal=True, backward=mode == "fwd+bwd"), args, repeats
        )
        for mode in ("fwd", "fwd+bwd")
    }


def speed_table(repeats: int) -> dict[str, dict[str, bench.Timing]]:
    results = {m: timings(m, MAIN_LEN, repeats) for m in ("xla", *LINEAR)}
    base = results["xla"]
    print(f"\n## N={MAIN_LEN}: time and compiled temporary memory vs xla\n")
    print("| method | fwd ms | fwd / xla | fwd+bwd ms | fwd+bwd / xla | temp MiB | temp / xla |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        f, fb = r["fwd"], r["fwd+bwd"]
        print(
            f"| {m} | {1e3 * f.median_s:.1f} | {f.median_s / base['fwd'].median_s:.3f} "
            f"| {1e3 * fb.median_s:.1f} | {fb.median_s / base['fwd+bwd'].median_s:.3f} "
            f"| {fb.temp_bytes / 2**20:.1f} | {fb.temp_bytes / base['fwd+bwd'].temp_bytes:.4f} |"
        )
    return results


def scaling_table(repeats: int, main: dict[str, dict[str, bench.Timing]]) -> dict[str, float]:
    print(f"\n## Scaling over N in {SCALING_LENS} (causal)\n")
    print(
        "| method | fwd t(32768)/t(8192) | fwd exponent | fwd+bwd t(32768)/t(8192) "
        "| fwd+bwd exponent | fwd ms by N |"
    )
    print("|---|---:|---:|---:|---:|---|")
    ratios = {}
    for m in LINEAR:
        by_len = {n: main[m] if n == MAIN_LEN else timings(m, n, repeats) for n in SCALING_LENS}
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            t = np.array([by_len[n][mode].median_s for n in SCALING_LENS])
            ratio = by_len[32768][mode].median_s / by_len[8192][mode].median_s
            exponent = np.polyfit(np.log(SCALING_LENS), np.log(t), 1)[0]
            cells += [f"{ratio:.2f}", f"{exponent:.2f}"]
            ratios[(m, mode)] = ratio
        ms = ", ".join(f"{1e3 * by_len[n]['fwd'].median_s:.0f}" for n in SCALING_LENS)
        print(f"| {m} | {' | '.join(cells)} | {ms} |")
    return ratios


def error_table() -> None:
    """Errors on random normal q, k, v (logits of std 1), and with q, k halved (std 1/4)."""
    n = ERROR_LEN
    q0, k0, v = bench.random_inputs(BATCH, n, n, HEADS, HEADS, HEAD_DIM, jnp.float32, seed=3)
    dout = np.random.default_rng(4).standard_normal((BATCH, n, HEADS, HEAD_DIM))
    print(f"\n## Approximation error at N={n} vs float64 reference (relative Frobenius)\n")
    print("| method | causal | q, k scale | out | dq | dk | dv |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for causal, qk_scale in ((True, 1.0), (True, 0.5), (False, 1.0)):
        q, k = q0 * qk_scale, k0 * qk_scale
        ref_out, _ = ea.numpy_reference(q, k, v, causal=causal)
        refs = (ref_out, *ea.numpy_reference_grads(q, k, v, dout, causal=causal))
        for m in ("xla", *LINEAR):
            f = jax.jit(lambda q, k, v, m=m, c=causal: ea.attention(q, k, v, method=m, causal=c))
            out, vjp = jax.vjp(f, q, k, v)
            got = (out, *vjp(jnp.asarray(dout, jnp.float32)))
            errs = " | ".join(
                f"{bench.relative_error(x, r):.3g}" for x, r in zip(got, refs, strict=True)
            )
            print(f"| {m} | {causal} | {qk_scale} | {errs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"# Linear attention benchmark ({bench.device_description()}, jax {jax.__version__})")
    print(
        f"B={BATCH}, heads={HEADS}, head_dim={HEAD_DIM}, float32, causal; median of "
        f"{args.repeats} runs after one warm-up; default options of each method"
    )
    main_results = speed_table(args.repeats)
    ratios = scaling_table(args.repeats, main_results)
    error_table()
    base = main_results["xla"]
    print("\n## Targets\n")
    for m in TARGETS:
        r = main_results[m]
        checks = {
            "fwd <= 0.1x xla": r["fwd"].median_s <= 0.1 * base["fwd"].median_s,
            "temp <= 0.05x xla": r["fwd+bwd"].temp_bytes <= 0.05 * base["fwd+bwd"].temp_bytes,
            "t(32768)/t(8192) <= 4^1.2": ratios[(m, "fwd")] <= 4**1.2,
        }
        print(f"- {m}: " + ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
