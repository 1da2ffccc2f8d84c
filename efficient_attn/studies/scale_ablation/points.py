"""The scale ablation's rules, settings and points (random-input and trained).

A trained point's :class:`efficient_attn.train.TrainConfig` comes from the
preset's ``[train]`` table with ``scale = rule(d)``, ``d_model = num_heads * d``
and the seed set by the study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficient_attn.sweep.spec import int_list

if TYPE_CHECKING:
    from efficient_attn.train import TrainConfig

#: rule name -> (directory slug, head_dim -> scale)
RULES: dict[str, tuple[str, Callable[[int], float]]] = {
    "1/sqrt(d)": ("inv_sqrt_d", lambda d: 1.0 / math.sqrt(d)),
    "1": ("one", lambda d: 1.0),
    "1/d": ("inv_d", lambda d: 1.0 / d),
}
SETTINGS: dict[str, Any] = {
    "rules": list(RULES),
    "head_dim": [16, 64, 256],
    "seq_lens": [256],
    "batch": 2,
    "heads": 4,
    "seeds": 4,
    "seed": 0,
    "train_head_dim": [64],  # [] : no training
    "train_seeds": [0],
    "train": {},  # TrainConfig fields (task defaults to mqar)
}
FLAGS: dict[str, str] = {
    "seq_lens": "seq_lens",
    "batch": "batch",
    "heads": "heads",
    "head_dim": "head_dim",
}
MEASUREMENTS: tuple[str, ...] = (
    "max_weight",
    "max_weight_std",
    "entropy",
    "entropy_std",
    "entropy_uniform",
    "grad_norm",
    "grad_norm_std",
    "logit_std",
    "accuracy",
    "eval_loss",
    "steps",
    "steps_to_90",
    "curve",
    "train_wall_s",
    "max_weight_layers",
    "entropy_layers",
)
_DERIVED = ("scale", "d_model", "seed")  # TrainConfig fields the study sets


def rule_names(settings: Mapping[str, Any]) -> list[str]:
    """The preset's scale rules, checked against :data:`RULES`."""
    names = settings["rules"] if isinstance(settings["rules"], list) else [settings["rules"]]
    bad = [r for r in names if r not in RULES]
    if bad or not names:
        raise ValueError(f"rules={names!r}: valid rules are {', '.join(RULES)}")
    return names


def train_config(settings: Mapping[str, Any], rule: str, head_dim: int, seed: int) -> TrainConfig:
    """The :class:`TrainConfig` of one trained point (validated)."""
    from efficient_attn.train import TrainConfig

    table = dict(settings["train"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(table) - (fields - set(_DERIVED)))
    if bad:
        valid = ", ".join(sorted(fields - set(_DERIVED)))
        raise ValueError(
            f"[train] key(s) {bad} not allowed: scale, d_model (= num_heads * head_dim) and "
            f"seed (train_seeds) are set by the study; valid keys: {valid}"
        )
    table.setdefault("task", "mqar")
    heads = table.get("num_heads", TrainConfig.num_heads)
    config = TrainConfig(
        **table, scale=RULES[rule][1](head_dim), d_model=heads * head_dim, seed=seed
    )
    config.validate()
    return config


def points(settings: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """Random-input points (rule x head_dim x length x batch x heads), then trained ones."""
    rules = rule_names(settings)
    seeds = int_list("seeds", settings["seeds"])[0]
    seed = int_list("seed", settings["seed"], minimum=0)[0]
    out = []
    for rule, h, t, b, n in itertools.product(
        rules,
        int_list("head_dim", settings["head_dim"]),
        int_list("seq_lens", settings["seq_lens"]),
        int_list("batch", settings["batch"]),
        int_list("heads", settings["heads"]),
    ):
        out.append(
            {
                "experiment": "scale_ablation",
                "key": f"scale_ablation|random|{rule}|H{h}|L{t}|B{b}|N{n}|seeds{seeds}|seed{seed}",
                "label": f"random {rule} head_dim={h}",
                "kind": "random",
                "scale_rule": rule,
                "scale": RULES[rule][1](h),
                "head_dim": h,
                "seq_len": t,
                "batch": b,
                "heads": n,
                "seeds": seeds,
                "seed": seed,
            }
        )
    train_dims = settings["train_head_dim"]
    for rule, h, s in itertools.product(
        rules,
        int_list("train_head_dim", train_dims) if train_dims != [] else [],
        int_list("train_seeds", settings["train_seeds"], minimum=0),
    ):
        config = dataclasses.asdict(train_config(settings, rule, h, s))
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
        run_dir = Path("runs") / f"{RULES[rule][0]}-h{h}-seed{s}-{digest}"
        out.append(
            {
                "experiment": "scale_ablation",
                "key": f"scale_ablation|trained|{rule}|H{h}|seed{s}|{digest}",
                "label": f"trained {rule} head_dim={h} seed={s} ({config['steps']} steps)",
                "kind": "trained",
                "scale_rule": rule,
                "scale": config["scale"],
                "head_dim": h,
                "seq_len": config["seq_len"],
                "batch": config["batch_size"],
                "heads": config["num_heads"],
                "seed": s,
                "task": config["task"],
                "run_dir": str(run_dir),
                "config": config,
                "run": {"run_dir": str(Path(out_dir).absolute() / run_dir)},
            }
        )
    return out
