"""Settings and points of the LRA studies: ``lra_efficiency`` and ``listops``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from efficient_attn.studies.base import method_list, train_config, trained_point
from efficient_attn.studies.lra.paper import PAPER_LENGTHS
from efficient_attn.sweep.spec import int_list

EFFICIENCY_SETTINGS: dict[str, Any] = {
    "methods": ["dense", "local", "strided", "bigbird", "linear_elu", "performer"],
    "seq_lens": list(PAPER_LENGTHS),
    "batch": 32,
    "vocab_size": 256,  # byte-level text
    "num_classes": 2,
    "d_model": 256,
    "num_layers": 4,
    "num_heads": 4,
    "mlp_ratio": 4,
    "repeats": 3,
    "warmup": 1,
    "options": {},
}
EFFICIENCY_MEASUREMENTS: tuple[str, ...] = (
    "steps_per_s",
    "step_ms",
    "step_ms_min",
    "step_ms_max",
    "memory_bytes",
    "compile_s",
    "load_avg_1m",
)


def efficiency_points(settings: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """One point per (length, method); shorter lengths first."""
    methods = method_list(settings)
    model = {
        name: int_list(name, settings[name])[0]
        for name in ("batch", "vocab_size", "num_classes", "d_model", "num_layers", "num_heads")
    }
    model["mlp_ratio"] = int_list("mlp_ratio", settings["mlp_ratio"])[0]
    if model["d_model"] % model["num_heads"]:
        raise ValueError(f"d_model={model['d_model']} must be divisible by num_heads")
    repeats = int_list("repeats", settings["repeats"])[0]
    warmup = int_list("warmup", settings["warmup"], minimum=0)[0]
    options = settings["options"]
    size = "|".join(f"{k}{v}" for k, v in model.items())
    points = []
    for t in int_list("seq_lens", settings["seq_lens"]):
        for m in methods:
            opts = dict(options.get(m, {}))
            points.append(
                {
                    "experiment": "lra_efficiency",
                    "key": f"lra_efficiency|{m}|{sorted(opts.items())}|L{t}|{size}|r{repeats}",
                    "label": f"{m} L={t}",
                    "family": f"{m}|{sorted(opts.items())}",
                    "method": m,
                    "options": opts,
                    "seq_len": t,
                    **model,
                    "repeats": repeats,
                    "warmup": warmup,
                }
            )
    return points


LISTOPS_SETTINGS: dict[str, Any] = {
    "methods": "all",
    "seeds": [0],
    "train": {"task": "listops"},
    "options": {},
}


def listops_points(settings: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """One training run per (method, seed)."""
    methods = method_list(settings)
    points = []
    for seed in int_list("seeds", settings["seeds"], minimum=0):
        for m in methods:
            table = {"task": "listops", **dict(settings["train"])}
            config = train_config(
                table, method=m, options=dict(settings["options"].get(m, {})), seed=seed
            )
            if config.task != "listops":
                raise ValueError(f"[train] task={config.task!r}: this study trains task 'listops'")
            points.append(
                trained_point(
                    "listops",
                    f"listops|{m}|seed{seed}",
                    f"{m} seed={seed} ({config.steps} steps)",
                    config,
                    out_dir,
                    method=m,
                    seed=seed,
                    seq_len=config.seq_len,
                )
            )
    return points
