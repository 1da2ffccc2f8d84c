"""Sequence-parallel attention across processes: per-device memory and time at one length.

Each process (one per node under Slurm) calls
:func:`efficient_attn.parallel.distributed.initialize` (from the Slurm environment, the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
variables, or the flags below), builds one mesh axis over every process's
devices, makes q, k, v split along the sequence (each process generates only
its own shards), compiles ``sequence_parallel_attention`` forward or
forward+backward, and process 0 prints the per-device compiled memory
(``memory_analysis()``: temp + arguments + outputs of one device's share) and
the median time per call (B=1, N=4, H=64, float32, causal by default).

    # Slurm: see scripts/slurm_sequence_parallel.sh
    srun python scripts/multinode_sequence_parallel.py --length 131072

    # two processes on localhost, 4 host devices each (8 devices in all)
    for i in 0 1; do
      python scripts/multinode_sequence_parallel.py --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id $i --cpu-devices 4 --length 2048 --check &
    done; wait
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

AXIS = "sp"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=32768, help="total sequence length")
    p.add_argument("--strategy", default="ring", choices=("ring", "all_to_all"))
    p.add_argument("--method", default="blockwise")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--check",
        action="store_true",
        help="also compare the forward output with one-device ea.attention (small lengths)",
    )
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (default: env)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument(
        "--cpu-devices", type=int, default=None, help="split each host CPU into this many devices"
    )
    args = p.parse_args(argv)
    args.passes = args.passes.split(",")
    bad = sorted(set(args.passes) - {"fwd", "fwd+bwd"})
    if bad:
        p.error(f"--passes {bad} not valid; valid: fwd, fwd+bwd")
    return args


def _sharded_normal(shape, sharding, dtype, seed: int):
    """A global array whose shards each process draws itself (same values on any layout)."""
    import jax

    def shard(index):
        starts = [s.start or 0 for s in index]
        sizes = [len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)]
        rng = np.random.default_rng([seed, *starts])
        return rng.standard_normal(sizes).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, shard)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from efficient_attn.parallel.distributed import initialize

    index, count = initialize(
        args.coordinator, args.num_processes, args.process_id, num_cpu_devices=args.cpu_devices
    )
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from efficient_attn import bench
    from efficient_attn.parallel import sequence_parallel_attention

    devices = jax.devices()
    mesh = Mesh(np.array(devices), (AXIS,))
    even = args.length % len(devices) == 0  # else the inputs arrive whole (padded inside)
    split = NamedSharding(mesh, PartitionSpec(None, AXIS) if even else PartitionSpec())
    shape = (args.batch, args.length, args.heads, args.head_dim)
    arrays = [_sharded_normal(shape, split, np.float32, args.seed + i) for i in range(4)]
    q, k, v, dout = (x.astype(jnp.dtype(args.dtype)) for x in arrays)

    def fwd(q, k, v):
        return sequence_parallel_attention(
            q, k, v, mesh=mesh, axis=AXIS, strategy=args.strategy, method=args.method,
            causal=args.causal,
        )  # fmt: skip

    def fwd_bwd(q, k, v, dout):
        out, vjp = jax.vjp(fwd, q, k, v)
        return (out, *vjp(dout))

    if index == 0:
        print(
            f"{count} processes, {len(devices)} devices ({jax.local_device_count()} per process, "
            f"{devices[0].platform}); {args.strategy} attention ({args.method}) over all of them: "
            f"B={args.batch} T={args.length:,} N={args.heads} H={args.head_dim} {args.dtype} "
            f"{'causal' if args.causal else 'non-causal'}",
            flush=True,
        )
        print("| pass | temp MiB | args MiB | out MiB | total MiB/device | ms/call (median) |")
        print("|---|---:|---:|---:|---:|---:|")
    for pass_ in args.passes:
        f, call_args = (fwd, (q, k, v)) if pass_ == "fwd" else (fwd_bwd, (q, k, v, dout))
        exe, _ = bench.compiled(f, *call_args)
        mem = exe.memory_analysis()
        times = bench.time_compiled(exe, call_args, args.repeats, warmup=1)
        if index == 0:
            mib = [
                x / 2**20
                for x in (
                    mem.temp_size_in_bytes,
                    mem.argument_size_in_bytes,
                    mem.output_size_in_bytes,
                )
            ]
            print(
                f"| {pass_} | {mib[0]:,.1f} | {mib[1]:,.1f} | {mib[2]:,.1f} | {sum(mib):,.1f} "
                f"| {statistics.median(times) * 1e3:,.1f} |",
                flush=True,
            )
    if args.check:
        from jax.experimental import multihost_utils

        import efficient_attn as ea

        out = multihost_utils.process_allgather(jax.jit(fwd)(q, k, v), tiled=True)
        full = [multihost_utils.process_allgather(x, tiled=True) for x in (q, k, v)]
        with jax.default_device(jax.local_devices()[0]):
            want = ea.attention(*full, method=args.method, causal=args.causal)
        error = bench.relative_error(out, want)
        if index == 0:
            print(f"check: relative error vs one-device attention {error:.1e}", flush=True)
        if not error < 1e-4:
            raise SystemExit(f"check failed: relative error {error:.1e}")
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
