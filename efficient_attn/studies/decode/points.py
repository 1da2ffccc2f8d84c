"""The decode study's settings and points: one per (method, K/V heads, context length)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from efficient_attn.studies.base import positive_number
from efficient_attn.sweep import report as sweep_report
from efficient_attn.sweep.spec import DTYPES, as_list, check_methods, int_list, option_grid

SETTINGS: dict[str, Any] = {
    "methods": [
        "dense",
        "blockwise",
        "xla",
        "local",
        "linear_elu",
        "performer",
        "retnet",
        "mamba2",
        "gla",
        "deltanet",
        "gated_deltanet",
    ],
    "seq_lens": [1024, 2048, 4096, 8192, 16384, 32768],
    "batch": 1,
    "heads": 8,
    "kv_heads": "auto",  # N, N/4 and 1 (MHA, GQA, MQA), or a list dividing heads
    "head_dim": 64,
    "dtype": "float32",
    "options": {},
    "repeats": 10,
    "warmup": 2,
    "timing_budget_s": 2.0,
    "seed": 0,
}
FLAGS: dict[str, str] = {
    "methods": "methods",
    "seq_lens": "seq_lens",
    "batch": "batch",
    "heads": "heads",
    "kv_heads": "kv_heads",
    "head_dim": "head_dim",
    "dtype": "dtype",
    "option": "options",
    "repeats": "repeats",
}
MEASUREMENTS: tuple[str, ...] = (
    "resolved_options",
    "decode_form",
    "cache_bytes",
    "cache_shapes",
    "temp_bytes",
    "compile_s",
    "repeats",
    "time_ms",
    "time_ms_min",
    "time_ms_max",
    "times_ms",
    "cache_gb_per_s",
)


def attention_kind(heads: int, kv_heads: int) -> str:
    """``"MHA"`` (K = N), ``"MQA"`` (K = 1) or ``"GQA"``."""
    return "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else "GQA"


def kv_heads_for(heads: int, setting: Any) -> list[int]:
    """K/V head counts for ``heads`` query heads: ``"auto"`` is N, N/4 (if whole) and 1."""
    if setting == "auto":
        values = [heads, heads // 4 if heads % 4 == 0 else heads, 1]
        return list(dict.fromkeys(values))
    values = int_list("kv_heads", setting)
    for k in values:
        if heads % k:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(f"kv_heads={k} must divide heads={heads}; valid kv_heads: {divisors}")
    return values


def points(settings: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """One payload per (dtype, batch, heads, head_dim, K, method, options, length)."""
    import efficient_attn as ea

    methods = check_methods(as_list("methods", settings["methods"]), ea.methods())
    dtypes = as_list("dtype", settings["dtype"])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"dtype={bad[0]!r} is not valid; valid values: {', '.join(DTYPES)}")
    options = settings["options"]
    if not isinstance(options, Mapping):
        raise ValueError("options must be a table: [options.METHOD] NAME = value or [values]")
    run = {
        "repeats": int_list("repeats", settings["repeats"])[0],
        "warmup": int_list("warmup", settings["warmup"])[0],
        "timing_budget_s": positive_number("timing_budget_s", settings["timing_budget_s"]),
    }
    seed = int_list("seed", settings["seed"], minimum=0)[0]
    out = []
    for dtype, b, n, h in itertools.product(
        dtypes,
        int_list("batch", settings["batch"]),
        int_list("heads", settings["heads"]),
        int_list("head_dim", settings["head_dim"]),
    ):
        for kh, method in itertools.product(kv_heads_for(n, settings["kv_heads"]), methods):
            for opts in option_grid(method, options.get(method, {})):
                family = (
                    f"decode|{method}|{json.dumps(opts, sort_keys=True, separators=(',', ':'))}"
                    f"|B{b}|N{n}|K{kh}|H{h}|{dtype}|seed{seed}"
                )
                for t in int_list("seq_lens", settings["seq_lens"]):
                    out.append(
                        {
                            "experiment": "decode",
                            "key": family.replace("|B", f"|L{t}|B", 1),
                            "family": family,
                            "label": f"{sweep_report.variant({'method': method, 'options': opts})}"
                            f" K={kh} L={t}",
                            "method": method,
                            "options": opts,
                            "seq_len": t,
                            "batch": b,
                            "heads": n,
                            "kv_heads": kh,
                            "attention": attention_kind(n, kh),
                            "head_dim": h,
                            "dtype": dtype,
                            "seed": seed,
                            "run": run,
                        }
                    )
    return sorted(out, key=lambda p: p["seq_len"])
