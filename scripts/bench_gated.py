"""Gated and delta-rule recurrences vs XLA's exact attention and linear_elu, in one run.

Issue 15's benchmark: B=1, 4 heads (MHA), head_dim 64, float32, causal. Per-token
inputs (``log_decay``, ``beta``) are drawn by the registry's initialisers and
passed as arguments of the compiled function (never baked in as constants).
Prints markdown tables:

1. at N=8192: forward and forward+backward time and the compiled temporary
   memory of forward+backward (``jax.jit(f).lower(*a).compile().memory_analysis()``),
   each against ``xla`` (``jax.nn.dot_product_attention``), and throughput
   (tokens/s) against ``linear_elu``;
2. time slope 8192 -> 32768: ``t(32768) / t(8192) / 4`` (1.0 is linear), forward and
   forward+backward: the median over rounds, each timing both lengths once (interleaved,
   so that a shared machine's load weighs on both alike).

Times are medians of ``--repeats`` runs after one warm-up, each blocked on with
``block_until_ready``. Targets per method: forward at 8192 <= 0.08x xla,
forward+backward temp memory <= 0.05x xla's, slope <= 1.15.

    python scripts/bench_gated.py [--repeats 5] [--methods gla,deltanet] [--baselines linear_elu]
        [--out experiments/results/cpu/gated/bench_gated.md]

``--methods`` restricts the gated methods and ``--baselines`` the timed baselines (xla's
forward+backward at 8192 takes minutes on a CPU); xla's compiled memory is always measured
(compile only), so the memory ratio is in every run. ``--out`` also writes the report there.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import efficient_attn as ea
from efficient_attn import bench

GATED = ("retnet", "mamba2", "gla", "deltanet", "gated_deltanet")
BATCH, HEADS, HEAD_DIM = 1, 4, 64
MAIN_LEN, LONG_LEN = 8192, 32768


def _fn(method: str, names: tuple[str, ...], backward: bool):
    """``f(q, k, v, *arrays)``: the output, or the gradients of ``sum(out * dout)``."""

    def fwd(q, k, v, *arrays):
        opts = dict(zip(names, arrays, strict=True))
        return ea.attention(q, k, v, method=method, causal=True, **opts)

    if not backward:
        return fwd

    def fwd_bwd(q, k, v, *arrays):
        out, vjp = jax.vjp(fwd, q, k, v, *arrays)
        return vjp(jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype))

    return fwd_bwd


def _args(method: str, n: int) -> tuple[tuple[str, ...], tuple]:
    """(array option names, arguments ``(q, k, v, *arrays)``) of ``method`` at length ``n``."""
    q, k, v = bench.random_inputs(BATCH, n, n, HEADS, HEADS, HEAD_DIM, jnp.float32)
    arrays = ea.init_arrays(method, jax.random.PRNGKey(2), HEAD_DIM, **bench.input_dims(q, k))
    return tuple(arrays), (q, k, v, *arrays.values())


def timings(method: str, n: int, repeats: int, modes=("fwd", "fwd+bwd")) -> dict:
    """{mode: bench.Timing} of ``method``, causal, at length ``n``."""
    names, args = _args(method, n)
    return {
        mode: bench.measure(_fn(method, names, mode == "fwd+bwd"), args, repeats) for mode in modes
    }


def slopes_of(method: str, repeats: int) -> dict:
    """{mode: (seconds at LONG_LEN, t(LONG_LEN) / t(MAIN_LEN) / 4)}, both lengths timed in
    interleaved rounds (:func:`bench.interleaved_ratios`) so that load from other processes
    weighs on both sides of the ratio alike."""
    (names, long_args), (_, main_args) = _args(method, LONG_LEN), _args(method, MAIN_LEN)
    pairs = []
    for mode in ("fwd", "fwd+bwd"):
        f = _fn(method, names, mode == "fwd+bwd")
        exes = (bench.compiled(f, *long_args)[0], bench.compiled(f, *main_args)[0])
        pairs.append((mode, (exes[0], long_args), (exes[1], main_args)))
    ratios = bench.interleaved_ratios(pairs, repeats)
    return {mode: (r[1], r[0] / (LONG_LEN / MAIN_LEN)) for mode, r in ratios.items()}


def xla_temp_bytes(n: int) -> int:
    """Compiled temporary memory of xla's forward+backward at length ``n`` (compile only)."""
    q, k, v = bench.random_inputs(BATCH, n, n, HEADS, HEADS, HEAD_DIM, jnp.float32)
    return bench.temp_bytes(bench.compiled(_fn("xla", (), True), q, k, v)[0])


def _names(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    names = tuple(x for x in text.split(",") if x)
    bad = [x for x in names if x not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown {bad}; valid: {', '.join(allowed)}")
    return names


def _ratio(num: float, den: float | None, fmt: str = ".3f") -> str:
    return "-" if den is None else f"{num / den:{fmt}}"


def report(args: argparse.Namespace) -> list[str]:
    """The markdown lines of one run (printed as they come)."""
    gated = _names(args.methods, GATED, "--methods")
    baselines = _names(args.baselines, ("xla", "linear_elu"), "--baselines")
    lines: list[str] = []

    def say(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    start = time.perf_counter()
    say(f"# Gated and delta-rule benchmark ({bench.device_description()}, jax {jax.__version__})")
    say(
        f"\nB={BATCH}, heads={HEADS} (K/V heads {HEADS}), head_dim={HEAD_DIM}, float32, causal; "
        f"median of {args.repeats} runs after one warm-up; default options of each method; "
        f"1-minute load average at start {os.getloadavg()[0]:.2f}"
    )
    xla_temp = xla_temp_bytes(MAIN_LEN)
    main = {m: timings(m, MAIN_LEN, args.repeats) for m in (*baselines, *gated)}
    xla, elu = main.get("xla"), main.get("linear_elu")
    xf, xfb = (None, None) if xla is None else (xla["fwd"].median_s, xla["fwd+bwd"].median_s)
    say(f"\n## N={MAIN_LEN}: time, compiled temp memory vs xla; throughput vs linear_elu\n")
    say(
        "| method | fwd ms | fwd / xla | fwd+bwd ms | fwd+bwd / xla | fwd+bwd temp MiB "
        "| temp / xla | fwd tokens/s | fwd throughput / linear_elu |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in main.items():
        f, fb = r["fwd"], r["fwd+bwd"]
        elu_ratio = "-" if elu is None else f"{elu['fwd'].median_s / f.median_s:.2f}"
        say(
            f"| {m} | {1e3 * f.median_s:.1f} | {_ratio(f.median_s, xf)} "
            f"| {1e3 * fb.median_s:.1f} | {_ratio(fb.median_s, xfb)} "
            f"| {fb.temp_bytes / 2**20:.1f} | {fb.temp_bytes / xla_temp:.4f} "
            f"| {BATCH * MAIN_LEN / f.median_s:,.0f} | {elu_ratio} |"
        )
    say(f"\n## Time slope {MAIN_LEN} -> {LONG_LEN}: t({LONG_LEN}) / t({MAIN_LEN}) / 4\n")
    say("| method | fwd ms at 32768 | fwd slope | fwd+bwd ms at 32768 | fwd+bwd slope |")
    say("|---|---:|---:|---:|---:|")
    slopes = {}
    for m in (*(b for b in baselines if b == "linear_elu"), *gated):
        cells = []
        for mode, (long_s, slope) in slopes_of(m, args.repeats).items():
            slopes[(m, mode)] = slope
            cells += [f"{1e3 * long_s:.0f}", f"{slope:.2f}"]
        say(f"| {m} | {' | '.join(cells)} |")
    say("\n## Targets\n")
    for m in gated:
        r = main[m]
        checks = {
            "fwd+bwd temp <= 0.05x xla": r["fwd+bwd"].temp_bytes <= 0.05 * xla_temp,
            "fwd slope <= 1.15": slopes[(m, "fwd")] <= 1.15,
            "fwd+bwd slope <= 1.15": slopes[(m, "fwd+bwd")] <= 1.15,
        }
        if xf is not None:
            checks = {"fwd <= 0.08x xla": r["fwd"].median_s <= 0.08 * xf, **checks}
        say(f"- {m}: " + ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()))
    say(
        f"\n(total {time.perf_counter() - start:.0f} s; "
        f"1-minute load average at end {os.getloadavg()[0]:.2f})"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--methods", default=",".join(GATED), help="gated methods, comma-separated")
    parser.add_argument(
        "--baselines", default="xla,linear_elu", help="timed baselines: xla, linear_elu or none"
    )
    parser.add_argument("--out", default=None, help="also write the markdown report to this path")
    args = parser.parse_args()
    lines = report(args)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
