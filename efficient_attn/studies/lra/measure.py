"""``lra_efficiency``'s worker side: compile and time one training step of a classifier.

(``listops`` points are training runs: :func:`efficient_attn.studies.base.measure_trained`.)
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def measure_efficiency(payload: dict[str, Any], row: dict[str, Any]) -> None:
    """Compile one training step at the payload's size; its memory and median time."""
    import os

    import jax
    import jax.numpy as jnp
    import optax

    from efficient_attn.nn import Classifier, ModelConfig

    b, t = payload["batch"], payload["seq_len"]
    model = Classifier(
        ModelConfig(
            vocab_size=payload["vocab_size"],
            max_len=t,
            d_model=payload["d_model"],
            num_layers=payload["num_layers"],
            num_heads=payload["num_heads"],
            mlp_ratio=payload["mlp_ratio"],
            method=payload["method"],
            options=payload["options"],
            num_classes=payload["num_classes"],
        )
    )
    key = jax.random.PRNGKey(0)
    tokens = jax.random.randint(key, (b, t), 0, payload["vocab_size"])  # [B, T]
    labels = jax.random.randint(key, (b,), 0, payload["num_classes"])  # [B]
    lengths = jnp.full((b,), t, jnp.int32)
    params = model.init(key, tokens[:1], lengths[:1])
    tx = optax.adamw(1e-3)
    state = (params, tx.init(params))

    def step(state, tokens, labels, lengths):
        params, opt = state

        def loss(p):
            logits = model.apply(p, tokens, lengths)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), value

    start = time.perf_counter()
    exe = jax.jit(step, donate_argnums=0).lower(state, tokens, labels, lengths).compile()
    row["compile_s"] = time.perf_counter() - start
    mem = exe.memory_analysis()
    if mem is not None:
        row["memory_bytes"] = int(
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        )
    for _ in range(payload["warmup"]):
        state, _ = jax.block_until_ready(exe(state, tokens, labels, lengths))
    times = []
    for _ in range(payload["repeats"]):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(exe(state, tokens, labels, lengths))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    row.update(
        steps_per_s=1.0 / median,
        step_ms=1e3 * median,
        step_ms_min=1e3 * min(times),
        step_ms_max=1e3 * max(times),
        load_avg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
