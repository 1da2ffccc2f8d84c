"""Training-loop speed: one step per dispatch (the old loop) against blocks of steps.

For each config, both loops train the same model from the same state in
interleaved rounds (this machine is shared: load hits both sides alike):

* ``per step``: the loop before blocks: per step, build the batch (a jitted
  generator, or NumPy for host tasks such as ListOps), run the jitted train step,
  wait for it (``block_until_ready``) before the next step;
* ``blocks``: :meth:`efficient_attn.train.Trainer.train_block`: ``n`` steps in one
  dispatch (``lax.scan``, donated state, batches made on the device; host tasks'
  next block built by NumPy while the device runs this one), as
  :func:`efficient_attn.train.train` runs it.

Reports medians over rounds of ms/step, tokens/s, the ratio, and FLOP utilisation
(XLA's FLOPs of one step over the time, against a float32 1024^3 matmul timed in the
same process); then the MQAR T256 step in blocks with ``dense`` (our reference softmax)
against ``xla`` (``jax.nn.dot_product_attention``), interleaved (``--methods-only``: that
table alone).

    python scripts/bench_train.py [--rounds 5] [--out FILE.md] [--methods-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from efficient_attn import bench
from efficient_attn.train import TrainConfig, Trainer
from efficient_attn.train.speed import compiled_flops

CONFIGS = {
    "mqar T64 P4 d64 B16": dict(task="mqar", seq_len=64, num_pairs=4, vocab_size=256),
    "mqar T256 P16 d64 B16": dict(task="mqar", seq_len=256, num_pairs=16, vocab_size=256),
    "listops T128 d64 B32": dict(
        task="listops", seq_len=128, min_length=32, max_depth=5, max_args=10, batch_size=32
    ),
}


def per_step(trainer: Trainer, state, first: int, n: int):
    for step in range(first, first + n):
        batch = jax.block_until_ready(trainer.batch(step))
        state, _ = jax.block_until_ready(trainer.train_step(state, batch))
    return state


def blocks(trainer: Trainer, state, first: int, n: int, pending):
    state, metrics = trainer.train_block(state, first, n, pending)
    pending = trainer.block_batches(first + n, n)  # built while the block runs
    jax.device_get(metrics)
    return state, pending


def share(flops: float | None, step_s: float, matmul: float) -> str:
    return "" if flops is None else f"{100 * flops / step_s / matmul:.1f}%"


def method_times(config_fields: dict, methods: tuple[str, ...], rounds: int, n: int) -> dict:
    """Median ms/step of blocks of ``n`` steps per method, interleaved rounds."""
    runs = {}
    for m in methods:
        config = TrainConfig(**{"d_model": 64, "batch_size": 16, "steps": 10**6,
                                **config_fields, "method": m})  # fmt: skip
        trainer = Trainer(config, "/nonexistent")
        state, pending = blocks(trainer, trainer.init_state(), 0, n, None)  # compile, warm up
        runs[m] = [trainer, state, pending, n, []]
    for _ in range(rounds):
        for run in runs.values():
            trainer, state, pending, step, times = run
            t0 = time.perf_counter()
            run[1], run[2] = blocks(trainer, state, step, n, pending)
            times.append((time.perf_counter() - t0) / n)
            run[3] = step + n
    return {m: 1e3 * statistics.median(run[4]) for m, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="steps per side per round")
    parser.add_argument("--out", default="experiments/results/cpu/train_speed/bench_train.md")
    parser.add_argument("--methods-only", action="store_true", help="only dense against xla")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    matmul = bench.matmul_flop_rate(1024)
    n = args.steps
    rows = []
    for name, fields in {} if args.methods_only else CONFIGS.items():
        config = TrainConfig(**{"d_model": 64, "batch_size": 16, "steps": 10**6, **fields})
        trainer = Trainer(config, "/nonexistent")
        state = trainer.init_state()
        flops = compiled_flops(trainer.train_step.lower(state, trainer.batch(0)))
        step = 0
        state = per_step(trainer, state, step, 2)  # compile and warm up both sides
        pending = trainer.block_batches(2, n)
        state, pending = blocks(trainer, state, 2, n, pending)
        step = 2 + n
        old, new = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            state, pending = blocks(trainer, state, step, n, pending)
            new.append((time.perf_counter() - t0) / n)
            step += n
            t0 = time.perf_counter()
            state = per_step(trainer, state, step, n)
            old.append((time.perf_counter() - t0) / n)
            step += n
            pending = trainer.block_batches(step, n)
        tokens = config.batch_size * config.seq_len
        t_old, t_new = statistics.median(old), statistics.median(new)
        ratio = statistics.median(o / w for o, w in zip(old, new, strict=True))
        rows.append(
            f"| {name} | {1e3 * t_old:.1f} | {1e3 * t_new:.1f} | {tokens / t_old:,.0f} | "
            f"{tokens / t_new:,.0f} | {ratio:.2f}x | {share(flops, t_old, matmul)} | "
            f"{share(flops, t_new, matmul)} |"
        )
        print(rows[-1], flush=True)
    lines = [
        "# Training-loop speed (`python scripts/bench_train.py`)",
        "",
        f"{bench.device_description()}, jax {jax.__version__}, float32, 2 layers, d_model 64, "
        f"{n} steps per side per round, {args.rounds} interleaved rounds, medians; blocks of "
        f"{n} steps per dispatch; matmul rate {matmul / 1e9:.0f} GFLOP/s (float32 1024^3, same "
        f"process); 1-minute load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        "| config | per step (ms/step) | blocks (ms/step) | per step (tokens/s) | "
        "blocks (tokens/s) | speed-up (median of per-round ratios) | per step: share of "
        "matmul rate | blocks: share of matmul rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    pair = ("dense", "xla")  # our reference softmax against jax.nn.dot_product_attention
    ms = method_times(CONFIGS["mqar T256 P16 d64 B16"], pair, args.rounds, n)
    print(ms, flush=True)
    lines += [
        "",
        f"Attention's share, blocks of {n} steps, mqar T256 P16 d64 B16, {args.rounds} "
        "interleaved rounds: `dense` (our reference, materialised masked softmax) against "
        "`xla` (`jax.nn.dot_product_attention`).",
        "",
        "| method | ms/step |",
        "|---|---:|",
        *(f"| {m} | {t:.1f} |" for m, t in ms.items()),
    ]
    bench.write_report(lines, args.out)


if __name__ == "__main__":
    main()
