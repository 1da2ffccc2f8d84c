"""Sequence-parallel attention: per-device compiled temporary memory (compile only).

What sequence parallelism is for: P devices hold a sequence P times longer at
the same memory per device. Measures ``memory_analysis().temp_size_in_bytes``
of the compiled SPMD program (one device's share; inputs arrive split along
the sequence and are not counted) for ring and all-to-all attention, forward
and forward+backward (B=1, N=4, H=64, float32, causal by default):

  1. T=32768 on 8 host devices against T=4096 on 1 device (the same strategy
     on a one-device mesh, and plain one-device ``blockwise``);
  2. per-device memory on 8 devices for T from 4k to 64k.

All-to-all splits heads, so it needs the K/V head count divisible by the
device count: with N=4 on 8 devices it is reported as n/a and measured with
N=8 instead. Nothing runs at these sizes; host devices share this machine's
memory, but the per-device figure is what carries over to accelerators.

    python scripts/bench_parallel.py
    python scripts/bench_parallel.py --lengths 4096,8192 --devices 4
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import efficient_attn as ea  # noqa: E402
from efficient_attn import bench  # noqa: E402
from efficient_attn.parallel import sequence_parallel_attention  # noqa: E402

AXIS = "sp"
PASSES = ((False, "fwd"), (True, "fwd+bwd"))


def _with_backward(fwd: Callable, backward: bool) -> Callable:
    """``f(q, k, v, dout)``: the output, or (dq, dk, dv) of ``sum(out * dout)``."""
    if not backward:
        return lambda q, k, v, dout: fwd(q, k, v)

    def fwd_bwd(q, k, v, dout):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) * dout), argnums=(0, 1, 2))(q, k, v)

    return fwd_bwd


def temp_mib(f: Callable, shape: tuple[int, ...], dtype, sharding=None) -> float | None:
    arg = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    exe, _ = bench.compiled(f, arg, arg, arg, arg)
    size = bench.temp_bytes(exe)
    return None if size is None else size / 2**20


_MEASURED: dict[tuple, float | None] = {}


def parallel_mib(strategy, t, devices, heads, args, backward) -> float | None:
    """Per-device temporary MiB of ``strategy`` at length ``t`` on ``devices`` devices."""
    key = (strategy, t, devices, heads, backward)
    if key not in _MEASURED:
        _MEASURED[key] = _parallel_mib(strategy, t, devices, heads, args, backward)
    return _MEASURED[key]


def _parallel_mib(strategy, t, devices, heads, args, backward) -> float | None:
    if strategy == "all_to_all" and heads % devices:
        return None
    mesh = Mesh(jax.devices()[:devices], (AXIS,))

    def fwd(q, k, v):
        return sequence_parallel_attention(
            q, k, v, mesh=mesh, axis=AXIS, strategy=strategy, method=args.method,
            causal=args.causal,
        )  # fmt: skip

    split = NamedSharding(mesh, PartitionSpec(None, AXIS))
    shape = (args.batch, t, heads, args.head_dim)
    return temp_mib(_with_backward(fwd, backward), shape, args.dtype, split)


def single_mib(t, heads, args, backward) -> float | None:
    def fwd(q, k, v):
        return ea.attention(q, k, v, method=args.method, causal=args.causal)

    return temp_mib(
        _with_backward(fwd, backward), (args.batch, t, heads, args.head_dim), args.dtype
    )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="blockwise")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--length", type=int, default=32768, help="total length on --devices")
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    p.add_argument("--non-causal", dest="causal", action="store_false")
    args = p.parse_args()
    args.dtype = jnp.dtype(args.dtype)
    d, t = args.devices, args.length
    if jax.device_count() < d:
        raise SystemExit(f"{d} devices requested, {jax.device_count()} available")
    heads_a2a = max(args.heads, d) if args.heads % d else args.heads
    print(f"# bench_parallel: per-device compiled temporary memory on {bench.device_description()}")
    print(
        f"{datetime.date.today()}, jax {jax.__version__}, method={args.method}, B={args.batch}, "
        f"N={args.heads}, H={args.head_dim}, {args.dtype.name}, causal={args.causal}; "
        "compile only (memory_analysis), MiB per device\n"
    )

    print(f"## T={t} on {d} devices vs T={t // d} on 1 device\n")
    print(
        f"| strategy | N | pass | 1 device, T={t // d} | {d} devices, T={t} | ratio | "
        f"one-device {args.method}, T={t // d} | ratio to it |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    rows = [("ring", args.heads), ("all_to_all", args.heads)]
    if heads_a2a != args.heads:
        rows.append(("all_to_all", heads_a2a))
    for strategy, heads in rows:
        for backward, name in PASSES:
            one = parallel_mib(strategy, t // d, 1, heads, args, backward)
            many = parallel_mib(strategy, t, d, heads, args, backward)
            base = single_mib(t // d, heads, args, backward)
            print(
                f"| {strategy} | {heads} | {name} | {_fmt(one)} | {_fmt(many)} | "
                f"{_ratio(many, one)} | {_fmt(base)} | {_ratio(many, base)} |"
            )
    if heads_a2a != args.heads:
        print(
            f"\nall_to_all needs K % {d} == 0: n/a with N=K={args.heads}; "
            f"measured at N={heads_a2a}."
        )

    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"\n## Per-device memory on {d} devices against T\n")
    print(
        f"| T | T/{d} | ring fwd | ring fwd+bwd | all_to_all fwd (N={heads_a2a}) | "
        f"all_to_all fwd+bwd (N={heads_a2a}) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for length in lengths:
        cells = [
            parallel_mib(s, length, d, h, args, bwd)
            for s, h in (("ring", args.heads), ("all_to_all", heads_a2a))
            for bwd, _ in PASSES
        ]
        print(f"| {length} | {length // d} | " + " | ".join(_fmt(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
