"""Additive (Bahdanau) attention vs dense softmax attention: compiled memory and time.

    python scripts/bench_additive.py [--mem-len 4096] [--time-len 1024] [--repeats 3]

Compiled temporary memory (XLA's ``memory_analysis``) of the forward and of
forward+backward at ``--mem-len`` for ``dense``, ``blockwise`` and
``additive`` (B=1, N=4, H=64, A=64, float32, causal), and median times at
``--time-len``, all in one process so that the ratios are side by side.
``additive`` never materialises its ``[Tq, Tk, A]`` hidden tensor (it is
evaluated one tile at a time), so its memory must stay at or below dense's.
"""

from __future__ import annotations

import argparse

from efficient_attn import bench

METHODS = ("dense", "blockwise", "additive")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mem-len", type=int, default=4096)
    p.add_argument("--time-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"# additive vs dense on {bench.device_description()}; B=1, N=4, H=64, A=64, causal\n")
    print(
        f"| method | temp MiB fwd @{args.mem_len} | x dense | temp MiB fwd+bwd | x dense "
        f"| fwd ms @{args.time_len} | fwd+bwd ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    q, k, v = bench.random_inputs(1, args.mem_len, args.mem_len, 4, 4, 64)
    qt, kt, vt = bench.random_inputs(1, args.time_len, args.time_len, 4, 4, 64)
    mem, times = {}, {}
    for m in METHODS:
        for backward in (False, True):
            f = bench.attention_fn(m, causal=True, backward=backward)
            mem[m, backward] = bench.temp_bytes(bench.compiled(f, q, k, v)[0]) / 2**20
            times[m, backward] = bench.measure(f, (qt, kt, vt), args.repeats).median_s * 1e3
    for m in METHODS:
        fwd, both = mem[m, False], mem[m, True]
        print(
            f"| {m} | {fwd:,.1f} | {fwd / mem['dense', False]:.3f} | {both:,.1f} | "
            f"{both / mem['dense', True]:.3f} | {times[m, False]:.1f} | {times[m, True]:.1f} |"
        )


if __name__ == "__main__":
    main()
