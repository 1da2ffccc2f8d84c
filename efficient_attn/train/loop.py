"""The training loop, :func:`train`: resume, metrics log, checkpoints and ``final.json``.

Outputs in ``out``: ``config.json``, ``metrics.jsonl`` (one row per logged
step), ``checkpoints/<step>/`` and ``final.json`` (held-out metrics and
:func:`efficient_attn.train.speed.throughput`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from efficient_attn.train.config import TrainConfig
from efficient_attn.train.speed import compiled_flops, throughput
from efficient_attn.train.trainer import Trainer


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep rows up to ``last_step`` (rows logged after the restored checkpoint are redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if row.get("step", math.inf) <= last_step:
            keep.append(line)
    path.write_text("".join(f"{line}\n" for line in keep))


#: Most optimizer steps in one dispatch (:func:`steps_per_dispatch`).
MAX_STEPS_PER_DISPATCH = 100


class _Bar:
    """A one-line training progress bar on stderr: step, loss, accuracy, ETA."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start_step, self.enabled = total, start, enabled
        self.t0 = time.perf_counter()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        filled = int(24 * step / self.total)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (24 - filled)}] {step}/{self.total} "
            f"loss {metrics.get('loss', float('nan')):.3f} acc {metrics.get('accuracy', 0):.2f} "
            f"{rate:.1f} it/s ETA {eta:.0f}s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def steps_per_dispatch(config: TrainConfig, cap: int = MAX_STEPS_PER_DISPATCH) -> int:
    """Optimizer steps per dispatch: the largest divisor (at most ``cap``) of every interval
    the host acts on (logging, evaluation, checkpoints, the last step), so a block never
    straddles one and one compiled block serves the whole run; at most half the run, so
    that a block after the first (which compiles) is timed."""
    g = math.gcd(config.log_every, config.eval_every, config.checkpoint_every, config.steps)
    top = min(g, cap, max(1, config.steps // 2))
    return max(d for d in range(1, top + 1) if g % d == 0)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) training; returns the contents of ``final.json``.

    ``stop_after`` ends the process-local loop after that many steps without
    writing ``final.json`` (used to test resumption as if the run was killed).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, out)
    config_json = dataclasses.asdict(config)
    manager = trainer.checkpoint_manager()
    metrics_path = out / "metrics.jsonl"
    if resume and manager.latest_step() is not None:
        saved = json.loads((out / "config.json").read_text())
        if saved != json.loads(json.dumps(config_json)):
            diff = sorted(k for k in saved if saved[k] != config_json.get(k))
            raise ValueError(f"--resume: config differs from the saved run in {diff}")
        state = trainer.restore(manager)
        _truncate_metrics(metrics_path, int(state["step"]))
    else:
        if any((out / "checkpoints").glob("*")) and not resume:
            raise ValueError(f"{out} already holds checkpoints: pass --resume or a new --out")
        state = trainer.init_state()
        _write_json(out / "config.json", config_json)
        metrics_path.write_text("")
    start = int(state["step"])
    n = steps_per_dispatch(config)
    bar = _Bar(config.steps, start, progress)
    t0 = time.perf_counter()
    flops_per_step = None
    step_s, data_s = [], []
    step = start
    batches = trainer.block_batches(step, n) if step < config.steps else None
    with metrics_path.open("a") as log:
        while step < config.steps:
            if stop_after is not None and step - start >= stop_after:
                manager.close()
                bar.close()
                return {}
            if flops_per_step is None:  # XLA's count of one step (a scan's counts its body once)
                flops_per_step = compiled_flops(
                    trainer.train_step.lower(state, trainer.batch(step))
                )
            t_step = time.perf_counter()
            state, metrics = trainer.train_block(state, step, n, batches)  # dispatched
            done = step + n
            t_data = time.perf_counter()  # the next block's host batches, built meanwhile
            batches = trainer.block_batches(done, n) if done < config.steps else None
            data_done = time.perf_counter()
            metrics = jax.device_get(metrics)  # waits for the block
            if step > start:  # the first block's time is mostly compilation
                step_s.append((time.perf_counter() - t_step) / n)
                if trainer.host:
                    data_s.append((data_done - t_data) / n)
            step = done
            if done % config.log_every == 0 or done == config.steps:
                row = {"step": done, **{k: float(v[-1]) for k, v in metrics.items()}}
                row["wall_s"] = time.perf_counter() - t0
                if done % config.eval_every == 0 or done == config.steps:
                    row.update(trainer.evaluate(state["params"]))
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.update(done, row)
                if on_log is not None:
                    on_log(row)
            if done % config.checkpoint_every == 0 or done == config.steps:
                manager.save(done, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()
    bar.close()
    final = {
        **trainer.evaluate(state["params"]),
        "step": int(state["step"]),
        "config": config_json,
        "train_wall_s": time.perf_counter() - t0,
        "resumed_from": start,
        **throughput(config, step_s, data_s, flops_per_step, n),
    }
    final["accuracy_metric"] = (
        "eval_greedy_accuracy" if "eval_greedy_accuracy" in final else "eval_accuracy"
    )
    final["accuracy"] = final[final["accuracy_metric"]]
    _write_json(out / "final.json", final)
    return final
