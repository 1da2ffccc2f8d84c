"""Core benchmark: blockwise vs jax.nn.dot_product_attention, side by side in one run.

Measures (issue "Core", defaults: B=1, N=4, H=64, float32, causal):
  1. compiled temporary memory of forward and forward+backward at --mem-len
     (compile only; nothing is run at that size);
  2. median time of forward and forward+backward at --time-len;
  3. non-causal forward FLOP rate against the float32 matmul rate of this run.

    python scripts/bench_core.py                       # CPU figures for the README
    python scripts/bench_core.py --dtype bfloat16 --head-dim 128 --baseline cudnn \
        --time-len 4096,8192,16384 --mem-len 16384     # on a GPU
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp

from efficient_attn import bench


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="xla", help="xla (CPU) or cudnn (GPU)")
    p.add_argument("--method", default="blockwise")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--time-len", default="4096", help="comma-separated lengths to time")
    p.add_argument("--mem-len", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    opts = {}
    if args.block_q:
        opts["block_q"] = args.block_q
    if args.block_k:
        opts["block_k"] = args.block_k
    b, n, h = 1, args.heads, args.head_dim
    base, meth = args.baseline, args.method

    print(f"# bench_core: {meth} vs {base} on {bench.device_description()}")
    print(f"{datetime.date.today()}, jax {jax.__version__}, B={b}, N={n}, H={h}, {dtype.name}")
    print(f"options: {opts or 'defaults'}\n")

    # 1. compiled temporary memory at mem_len (causal).
    t = args.mem_len
    shapes = [jax.ShapeDtypeStruct((b, t, n, h), dtype)] * 3
    print(f"## Compiled temporary memory, causal, T={t} (MiB)\n")
    print(f"| pass | {base} | {meth} | ratio |\n|---|---:|---:|---:|")
    for backward, name in ((False, "fwd"), (True, "fwd+bwd")):
        mem = {}
        for m, o in ((base, {}), (meth, opts)):
            f = bench.attention_fn(m, causal=True, backward=backward, **o)
            mem[m] = bench.temp_bytes(bench.compiled(f, *shapes)[0])
        ratio = mem[meth] / mem[base] if mem[base] and mem[meth] is not None else float("nan")
        print(f"| {name} | {_mib(mem[base])} | {_mib(mem[meth])} | {ratio:.4f} |")

    # 2. time (causal), and 3. FLOP rate (non-causal), side by side.
    matmul = bench.matmul_flop_rate(2048, dtype)
    print(f"\n## Time (median of {args.repeats}, ms) and FLOP rate\n")
    print(f"{dtype.name} 2048^3 matmul in this run: {matmul / 1e9:,.1f} GFLOP/s\n")
    print(
        f"| T | causal | pass | {base} ms | {meth} ms | ratio | {meth} GFLOP/s | "
        "of matmul |\n|---:|---|---|---:|---:|---:|---:|---:|"
    )
    for t in (int(x) for x in args.time_len.split(",")):
        args_ = bench.random_inputs(b, t, t, n, n, h, dtype)
        for causal, backward in ((True, False), (True, True), (False, False)):
            times = {}
            for m, o in ((base, {}), (meth, opts)):
                f = bench.attention_fn(m, causal=causal, backward=backward, **o)
                times[m] = bench.measure(f, args_, repeats=args.repeats).median_s
            flops = bench.attention_flops(b, n, t, t, h, causal=causal, backward=backward)
            rate = flops / times[meth]
            print(
                f"| {t} | {causal} | {'fwd+bwd' if backward else 'fwd'} | "
                f"{times[base] * 1e3:,.1f} | {times[meth] * 1e3:,.1f} | "
                f"{times[meth] / times[base]:.2f} | {rate / 1e9:,.1f} | {rate / matmul:.0%} |"
            )


if __name__ == "__main__":
    main()
