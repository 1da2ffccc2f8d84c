"""``efficient-attn train``: its flags, the config they give, and :func:`run`."""

from __future__ import annotations

import json

from efficient_attn.tasks import TASKS
from efficient_attn.train.config import TASK_DEFAULTS, TASK_SETTINGS, TrainConfig
from efficient_attn.train.loop import train

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
