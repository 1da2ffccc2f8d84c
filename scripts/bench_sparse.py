"""Sparse family vs ``jax.nn.dot_product_attention``: time, compiled memory and scaling.

B=1, 4 heads, head_dim 64, float32, causal, default options. For each sparse
method: forward and forward+backward time at N=8192 relative to ``xla``,
compiled temporary memory of forward+backward relative to ``xla``, the ratio
t(32768)/t(8192), and the scaling exponent fitted on log-log over all lengths.
``xla`` is timed up to ``--xla-max-len`` (forward+backward only at 8192); at
longer lengths its memory is read from compilation without running.

Everything is compiled first, then timed in rounds (one call of every
configuration per round, a method's lengths back to back, after a warm-up
round), so that load from other processes affects all lengths alike; times are
medians over rounds and t(32768)/t(8192) is the median of the per-round ratios.

    python scripts/bench_sparse.py [--lengths 2048,4096,8192,16384,32768] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from efficient_attn import bench

METHODS = ("local", "strided", "bigbird")
BASELINE = "xla"
REF_LEN = 8192
MiB = 2**20


def exponent(lengths, times) -> float:
    """Slope of log(time) against log(length)."""
    return float(np.polyfit(np.log(lengths), np.log(times), 1)[0])


def measure_all(lengths, repeats, xla_repeats, xla_max_len, ref_len):
    """(per-round seconds by (method, backward, length), temp bytes by (method, length))."""
    exes, temps, inputs = {}, {}, {}
    for t in lengths:
        inputs[t] = bench.random_inputs(1, t, t, 4, 4, 64)
        for name in (*METHODS, BASELINE):
            for backward in (False, True):
                f = bench.attention_fn(name, causal=True, backward=backward)
                exe, _ = bench.compiled(f, *inputs[t])
                if backward:
                    temps[name, t] = bench.temp_bytes(exe)
                if name != BASELINE or (t <= xla_max_len and (not backward or t == ref_len)):
                    exes[name, backward, t] = exe
    samples = {key: [] for key in sorted(exes, key=str)}  # a method's lengths run back to back
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, backward, t in samples:
            if name == BASELINE and round_ > xla_repeats:
                continue
            start = time.perf_counter()
            jax.block_until_ready(exes[name, backward, t](*inputs[t]))
            if round_:
                samples[name, backward, t].append(time.perf_counter() - start)
    return samples, temps


def run(lengths, repeats: int, xla_repeats: int, xla_max_len: int, ref_len: int) -> None:
    print(f"# device {bench.device_description()}, jax {jax.__version__}")
    print(
        f"# B=1 N=4 H=64 float32 causal, default options; medians of {repeats} rounds "
        f"({xla_repeats} for {BASELINE})\n"
    )
    samples, temps = measure_all(lengths, repeats, xla_repeats, xla_max_len, ref_len)
    times = {key: statistics.median(s) for key, s in samples.items()}

    def ms(key):
        if key not in samples:
            return "-"
        return f"{times[key] * 1e3:.1f} / {min(samples[key]) * 1e3:.1f}"

    print(
        "| method | seq | fwd ms (median / min) | fwd+bwd ms (median / min) | fwd+bwd temp MiB |\n"
        "|---|---:|---:|---:|---:|"
    )
    for t in lengths:
        for name in (*METHODS, BASELINE):
            temp = temps[name, t]
            temp = "n/a" if temp is None else f"{temp / MiB:.1f}"
            print(f"| {name} | {t} | {ms((name, False, t))} | {ms((name, True, t))} | {temp} |")

    big = max(lengths)
    base_fwd, base_fb = times[BASELINE, False, ref_len], times[BASELINE, True, ref_len]
    base_temp = temps[BASELINE, ref_len]
    print(
        "\n# time ratios to xla: of medians; t ratios: median of per-round ratios / ratio of"
        " minima;\n# exponents: fitted on medians / on minima\n"
        f"| method | fwd / xla @{ref_len} | fwd+bwd / xla @{ref_len} | "
        f"temp / xla @{ref_len} | fwd t({big})/t({ref_len}) | fwd+bwd t({big})/t({ref_len}) | "
        "fwd exponent | fwd+bwd exponent |\n" + "|---" * 8 + "|"
    )
    for name in (*METHODS, BASELINE):
        cells = ["1", "1", "1"]
        if name != BASELINE:
            cells = [
                f"{times[name, False, ref_len] / base_fwd:.3f}",
                f"{times[name, True, ref_len] / base_fb:.3f}",
                "n/a" if not base_temp else f"{temps[name, ref_len] / base_temp:.4f}",
            ]
        for backward in (False, True):  # median of per-round ratios / ratio of minima
            pair = [samples.get((name, backward, t)) for t in (big, ref_len)]
            if None in pair:
                cells.append("-")
                continue
            ratios = [a / b for a, b in zip(*pair, strict=True)]
            cells.append(f"{statistics.median(ratios):.2f} / {min(pair[0]) / min(pair[1]):.2f}")
        for backward in (False, True):  # fitted on medians / on minima
            keys = [(name, backward, t) for t in lengths if (name, backward, t) in samples]
            if len(keys) < 2:
                cells.append("-")
                continue
            ts = [k[2] for k in keys]
            fits = [
                exponent(ts, [stat(samples[k]) for k in keys]) for stat in (statistics.median, min)
            ]
            cells.append(f"{fits[0]:.2f} / {fits[1]:.2f} ({ts[0]}..{ts[-1]})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        f"\n# targets (local, bigbird): time <= 0.1x xla, temp <= 0.05x xla, "
        f"t({big})/t({ref_len}) <= 4^1.2 = {4**1.2:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--xla-repeats", type=int, default=2, help="timed rounds of xla")
    parser.add_argument("--ref-len", type=int, default=REF_LEN, help="length of the ratios")
    parser.add_argument(
        "--xla-max-len", type=int, default=REF_LEN, help="longest length at which xla is timed"
    )
    args = parser.parse_args()
    lengths = sorted({int(x) for x in args.lengths.split(",")} | {args.ref_len})
    run(lengths, args.repeats, min(args.xla_repeats, args.repeats), args.xla_max_len, args.ref_len)


if __name__ == "__main__":
    main()
