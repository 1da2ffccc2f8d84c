"""Train a small model with any attention method on a synthetic task.

The task's ``kind`` picks the model: a :class:`DecoderLM` for next-token tasks
(``mqar``, ``long_range``), an :class:`EncoderDecoder` for sequence-to-sequence
tasks (``reverse``, ``sort``), whose reported ``accuracy`` is the held-out
token accuracy of greedy autoregressive decoding (``eval_loss`` and
``eval_accuracy`` stay teacher-forced), and a :class:`Classifier` (LRA's
encoder with a pooled head) for classification tasks (``listops``), whose
``accuracy`` is held-out classification accuracy.

AdamW with linear warmup and cosine decay (optax); held-out evaluation on a
separate seed; orbax checkpoints (periodic, atomic, the last few kept).
``resume=True`` restores the latest checkpoint and continues with the same
data stream (batches are a function of (seed, step)) and optimizer state.

Outputs in ``out``: ``config.json``, ``metrics.jsonl`` (one row per logged
step), ``checkpoints/<step>/`` and ``final.json``. ``final.json`` also records
training throughput: ``tokens_per_s`` (``batch_size * seq_len`` over the median
compiled train step, timed with ``block_until_ready``, without the first
(compiling) step and without data generation), ``flops_per_step`` (XLA's cost
analysis of the compiled train step), ``matmul_flop_s`` (a float32 matmul
timed in the same process after its first run: the machine's dense ceiling) and
``flop_utilisation`` (achieved FLOP/s over ``matmul_flop_s``; near 1 the run
is compute-bound). :func:`train` draws no figures: ``efficient-attn train``
adds the cross-attention alignment of sequence-to-sequence runs
(:func:`efficient_attn.train.analysis.write_run_alignment`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import efficient_attn as ea
from efficient_attn import bench
from efficient_attn.nn import Classifier, DecoderLM, EncoderDecoder, ModelConfig, greedy_decode
from efficient_attn.nn.model import POOLINGS
from efficient_attn.tasks import TASKS, Batch, make_task

EVAL_SEED_OFFSET = 1_000_003  # held-out batches come from a disjoint seed

#: task kind -> (model class, batch -> the model's inputs)
MODELS: dict[str, tuple[type, Callable[[Any], tuple[jax.Array, ...]]]] = {
    "lm": (DecoderLM, lambda b: (b.inputs,)),
    "seq2seq": (EncoderDecoder, lambda b: (b.sources, b.inputs)),
    "classify": (Classifier, lambda b: (b.inputs, b.lengths)),
}
#: TrainConfig fields handed to the task (those a task does not have must stay None).
TASK_SETTINGS: tuple[str, ...] = (
    "vocab_size",
    "num_pairs",
    "distance",
    "num_queries",
    "max_depth",
    "max_args",
    "min_length",
)

#: TrainConfig fields whose defaults differ per task (used by ``TrainConfig.for_task``
#: and the CLI). Reversing 16 tokens, held-out greedy accuracy is 1.0 with dense
#: attention (31 s of training) and 0.9996 with additive (75 s) on a shared 2-core CPU.
_SEQ2SEQ_DEFAULTS = {
    "seq_len": 16,
    "d_model": 64,
    "num_layers": 1,
    "num_heads": 2,
    "steps": 600,
    "batch_size": 64,
    "learning_rate": 1e-2,
    "warmup_steps": 50,
    "eval_every": 100,
    "checkpoint_every": 200,
}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "reverse": _SEQ2SEQ_DEFAULTS,
    "sort": _SEQ2SEQ_DEFAULTS,
    # a CPU-sized ListOps; LRA's is max_depth 10, lengths (500, 2000): experiments/listops_lra.toml
    "listops": {"seq_len": 256, "max_depth": 6, "min_length": 64, "batch_size": 32},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved to ``config.json`` and checked on resume."""

    task: str = "mqar"
    seq_len: int = 64
    vocab_size: int | None = None  # None: the task's default
    num_pairs: int | None = None  # mqar
    distance: int | None = None  # long_range
    num_queries: int | None = None  # long_range
    max_depth: int | None = None  # listops
    max_args: int | None = None  # listops
    min_length: int | None = None  # listops (seq_len is its max_length)
    pooling: str = "mean"  # classification tasks: "mean" or "cls"
    method: str = "dense"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    kv_heads: int | None = None
    scale: float | None = None  # attention logit scale (None: the method's default)
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    log_every: int = 50
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0

    @classmethod
    def for_task(cls, task: str, **fields: Any) -> TrainConfig:
        """A config for ``task`` with its :data:`TASK_DEFAULTS`, overridden by ``fields``."""
        return cls(task=task, **{**TASK_DEFAULTS.get(task, {}), **fields})

    def task_obj(self):
        """The task; ``seq_len`` sets the task's length field (listops: ``max_length``)."""
        length = getattr(TASKS.get(self.task), "length_field", "seq_len")
        settings = {name: getattr(self, name) for name in TASK_SETTINGS}
        return make_task(self.task, **{length: self.seq_len}, **settings)

    def model_config(self) -> ModelConfig:
        task = self.task_obj()
        return ModelConfig(
            num_classes=getattr(task, "num_classes", None),
            pooling=self.pooling,
            vocab_size=task.vocab_size,
            max_len=self.seq_len,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.kv_heads,
            method=self.method,
            options=dict(self.options),
            scale=self.scale,
        )

    def validate(self) -> None:
        ea.get_method(self.method).resolve_options(self.options)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}; valid: {', '.join(POOLINGS)}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by {self.num_heads=}")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.num_heads % self.kv_heads):
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of {self.kv_heads=}")
        self.task_obj()


def masked_metrics(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, accuracy) over the scored positions."""
    mask = batch.mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch.targets)
    denom = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == batch.targets).astype(jnp.float32)
    return (ce * mask).sum() / denom, (correct * mask).sum() / denom


class Trainer:
    """Holds the model, optimizer, jitted steps and checkpoint manager of one run."""

    def __init__(self, config: TrainConfig, out: str | Path):
        config.validate()
        self.config, self.out = config, Path(out)
        self.task = config.task_obj()
        model_cls, self.model_inputs = MODELS[self.task.kind]
        self.model = model_cls(config.model_config())
        #: ``generate(params, sources [B, S]) -> [B, T]`` greedy outputs (seq2seq), else None
        self.generate = None
        if isinstance(self.model, EncoderDecoder):
            self.generate = jax.jit(
                functools.partial(
                    greedy_decode, self.model, length=config.seq_len, bos=self.task.bos
                )
            )
        schedule = optax.warmup_cosine_decay_schedule(
            0.0,
            config.learning_rate,
            config.warmup_steps,
            max(config.steps, config.warmup_steps + 1),
        )
        self.tx = optax.adamw(schedule, weight_decay=config.weight_decay)

        def loss_fn(params, batch):
            return masked_metrics(self.model.apply(params, *self.model_inputs(batch)), batch)

        def train_step(state, batch):
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
            return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads)}

        self.train_step = jax.jit(train_step, donate_argnums=0)
        self.eval_step = jax.jit(loss_fn)
        if getattr(self.task, "host", False):  # generated by NumPy on the host (listops)
            self._batch = lambda seed, step: jax.tree.map(
                jnp.asarray, self.task.batch(seed, step, self.config.batch_size)
            )
        else:
            self._batch = jax.jit(
                lambda seed, step: self.task.batch(seed, step, self.config.batch_size)
            )

    def init_state(self) -> dict[str, Any]:
        sample = self.model_inputs(
            jax.tree.map(jnp.asarray, self.task.batch(self.config.seed, 0, 1))
        )
        params = jax.jit(self.model.init)(jax.random.PRNGKey(self.config.seed), *sample)
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.int32(0)}

    def batch(self, step: int, seed: int | None = None) -> Batch:
        """Batch ``step`` of the stream of ``seed`` (default: the training seed)."""
        return self._batch(self.config.seed if seed is None else seed, step)

    def evaluate(self, params) -> dict[str, float]:
        """Held-out loss and accuracy (teacher-forced); greedy decoding's for seq2seq."""
        seed = self.config.seed + EVAL_SEED_OFFSET
        batches = [self.batch(i, seed) for i in range(self.config.eval_batches)]
        losses, accs = zip(*(self.eval_step(params, b) for b in batches), strict=True)
        metrics = {"eval_loss": float(np.mean(losses)), "eval_accuracy": float(np.mean(accs))}
        if self.generate is not None:
            correct = np.concatenate(
                [np.asarray(self.generate(params, b.sources) == b.targets) for b in batches]
            )  # [eval_batches * B, T]
            mask = np.concatenate([np.asarray(b.mask) for b in batches])
            metrics["eval_greedy_accuracy"] = float((correct & mask).sum() / max(mask.sum(), 1))
            metrics["eval_greedy_exact_match"] = float((correct | ~mask).all(axis=1).mean())
        return metrics

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.keep_checkpoints,
            save_interval_steps=self.config.checkpoint_every,
            enable_async_checkpointing=False,
        )
        return ocp.CheckpointManager((self.out / "checkpoints").absolute(), options=options)

    def restore(self, manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
        """The checkpointed state at ``step`` (default: the latest)."""
        step = manager.latest_step() if step is None else step
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(  # shapes only: nothing is initialised or compiled
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(self.init_state),
        )
        return manager.restore(step, args=ocp.args.StandardRestore(target))


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


def compiled_flops(exe: Any) -> float | None:
    """FLOPs of one call of a compiled executable by XLA's cost analysis (None if unknown)."""
    try:
        cost = exe.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


@functools.cache
def _matmul_rate(n: int) -> float:
    """A float32 ``n``-cubed matmul's FLOP/s, measured once per process (after the first run)."""
    return bench.matmul_flop_rate(n, jnp.float32)


def throughput(
    config: TrainConfig, step_s: list[float], data_s: list[float], flops_per_step: float | None
) -> dict[str, Any]:
    """Tokens/s and FLOP utilisation of the run against a matmul timed now, in this process."""
    if not step_s:
        return {"tokens_per_s": None, "step_ms_median": None, "flop_utilisation": None}
    step = float(np.median(step_s))
    n = 1024 if jax.default_backend() == "cpu" else 4096
    matmul = _matmul_rate(n)
    achieved = None if flops_per_step is None else flops_per_step / step
    return {
        "tokens_per_s": config.batch_size * config.seq_len / step,
        "step_ms_median": 1e3 * step,
        "data_ms_median": 1e3 * float(np.median(data_s)),
        "timed_steps": len(step_s),
        "flops_per_step": flops_per_step,
        "achieved_flop_s": achieved,
        "matmul_flop_s": matmul,
        "matmul_n": n,
        "flop_utilisation": None if achieved is None else achieved / matmul,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


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
    bar = _Bar(config.steps, start, progress)
    t0 = time.perf_counter()
    step_fn, flops_per_step = None, None
    step_s, data_s = [], []
    with metrics_path.open("a") as log:
        for step in range(start, config.steps):
            if stop_after is not None and step - start >= stop_after:
                manager.close()
                bar.close()
                return {}
            t_data = time.perf_counter()
            batch = jax.block_until_ready(trainer.batch(step))
            t_step = time.perf_counter()
            if step_fn is None:  # compile once, ahead of time, to read its FLOPs
                step_fn = trainer.train_step.lower(state, batch).compile()
                flops_per_step = compiled_flops(step_fn)
            state, metrics = jax.block_until_ready(step_fn(state, batch))
            if step > start:  # the first step's time is mostly compilation
                data_s.append(t_step - t_data)
                step_s.append(time.perf_counter() - t_step)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                row = {"step": done, **{k: float(v) for k, v in metrics.items()}}
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
        **throughput(config, step_s, data_s, flops_per_step),
    }
    final["accuracy_metric"] = (
        "eval_greedy_accuracy" if "eval_greedy_accuracy" in final else "eval_accuracy"
    )
    final["accuracy"] = final[final["accuracy_metric"]]
    _write_json(out / "final.json", final)
    return final


#: CLI flag -> TrainConfig field, for flags whose default comes from the config.
_FLAGS = {
    "seq_len": "seq_len",
    "d_model": "d_model",
    "layers": "num_layers",
    "heads": "num_heads",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "warmup": "warmup_steps",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "seed": "seed",
}


def _default_help(field: str) -> str:
    default = getattr(TrainConfig(), field)
    per_task = ", ".join(
        f"{task}: {fields[field]}"
        for task, fields in TASK_DEFAULTS.items()
        if fields.get(field, default) != default
    )
    return f"default {default}" + (f" ({per_task})" if per_task else "")


def add_arguments(p) -> None:
    """Flags of ``efficient-attn train`` (defaults: :class:`TrainConfig`, then TASK_DEFAULTS)."""
    d = TrainConfig()
    p.add_argument("--task", default=d.task, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--method", default=d.method)
    p.add_argument("--options", default="{}", help="method options as JSON, e.g. '{\"window\": 8}'")
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (1: MQA)")
    p.add_argument("--scale", type=float, default=None, help="logit scale (default: 1/sqrt(H))")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--num-pairs", type=int, default=None, help="mqar key-value pairs")
    p.add_argument("--distance", type=int, default=None, help="long_range distance")
    p.add_argument("--num-queries", type=int, default=None, help="long_range queries")
    p.add_argument("--max-depth", type=int, default=None, help="listops tree depth")
    p.add_argument("--max-args", type=int, default=None, help="listops arguments per operator")
    p.add_argument("--min-length", type=int, default=None, help="listops (--seq-len: max)")
    p.add_argument("--pooling", default=None, help="classification head: mean or cls")
    for flag, field in _FLAGS.items():
        kind = type(getattr(d, field))
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, help=_default_help(field))
    p.add_argument("--out", default=None, help="run directory (default runs/train/<task>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> TrainConfig:
    """The flags given, else the task's :data:`TASK_DEFAULTS`, else TrainConfig's."""
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        raise ValueError(f"--options must be a JSON object: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    given = {field: getattr(args, flag) for flag, field in _FLAGS.items()}
    given.update({name: getattr(args, name, None) for name in (*TASK_SETTINGS, "pooling")})
    return TrainConfig.for_task(
        args.task,
        method=args.method,
        options=options,
        kv_heads=args.kv_heads,
        scale=args.scale,
        **{k: v for k, v in given.items() if v is not None},
    )


def default_out(config: TrainConfig) -> str:
    return f"runs/train/{config.task}-{config.method}"


def run(args) -> int:
    """``efficient-attn train``: train, then print the final held-out accuracy and throughput."""
    config = config_from_args(args)
    out = args.out or default_out(config)
    final = train(config, out, resume=args.resume, progress=not args.no_progress)
    greedy = "eval_greedy_accuracy" in final
    teacher = f" (greedy; teacher-forced {final['eval_accuracy']:.4f})" if greedy else ""
    speed = ""
    if final.get("tokens_per_s"):
        speed = f"; {final['tokens_per_s']:,.0f} tokens/s"
        if final.get("flop_utilisation") is not None:
            speed += f", {100 * final['flop_utilisation']:.1f}% of the measured matmul rate"
    print(
        f"{config.task} / {config.method}: held-out accuracy {final['accuracy']:.4f}{teacher} "
        f"after {final['step']} steps ({final['train_wall_s']:.0f} s{speed}); results in {out}"
    )
    return 0
