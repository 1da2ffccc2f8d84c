"""Training speed: tokens/s, XLA's FLOPs of the train step and FLOP utilisation.

Utilisation is achieved FLOP/s over ``matmul_flop_s``, a float32 matmul timed
in the same process after its first run (the machine's dense ceiling).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import bench
from efficient_attn.train.config import TrainConfig


def compiled_flops(exe: Any) -> float | None:
    """FLOPs of one call of a lowered or compiled function by XLA's cost analysis (None if
    unknown)."""
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
    config: TrainConfig,
    step_s: list[float],
    data_s: list[float],
    flops_per_step: float | None,
    steps_per_dispatch: int = 1,
) -> dict[str, Any]:
    """Tokens/s and FLOP utilisation of the run against a matmul timed now, in this process.

    ``step_s``: seconds per step of each timed dispatch (its time over its steps);
    ``data_s``: the same for building host batches (empty where the device makes them)."""
    if not step_s:
        return {"tokens_per_s": None, "step_ms_median": None, "flop_utilisation": None}
    step = float(np.median(step_s))
    n = 1024 if jax.default_backend() == "cpu" else 4096
    matmul = _matmul_rate(n)
    achieved = None if flops_per_step is None else flops_per_step / step
    return {
        "tokens_per_s": config.batch_size * config.seq_len / step,
        "step_ms_median": 1e3 * step,
        "data_ms_median": 1e3 * float(np.median(data_s)) if data_s else 0.0,
        "timed_steps": len(step_s) * steps_per_dispatch,
        "steps_per_dispatch": steps_per_dispatch,
        "flops_per_step": flops_per_step,
        "achieved_flop_s": achieved,
        "matmul_flop_s": matmul,
        "matmul_n": n,
        "flop_utilisation": None if achieved is None else achieved / matmul,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
