"""The scale ablation's worker side: softmax statistics on random inputs, or train a model.

Random rows: ``max_weight``, ``entropy``, ``grad_norm`` and ``logit_std`` of
dense attention on standard normal ``[B, T, N, d]`` inputs. Trained rows: an
MQAR run (resumable) and its attention's statistics on a held-out batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from efficient_attn.train import TrainConfig


def _softmax_stats(weights, mask=None) -> tuple[Any, Any]:
    """(mean max weight, mean entropy in nats) of the rows of ``weights [B, N, Tq, Tk]``.

    ``mask [B, Tq]`` (optional) keeps only some query rows. Traceable.
    """
    import jax.numpy as jnp
    from jax.scipy.special import entr

    row_max, row_entropy = weights.max(-1), entr(weights).sum(-1)  # [B, N, Tq]
    if mask is None:
        return row_max.mean(), row_entropy.mean()
    keep = jnp.broadcast_to(mask[:, None, :], row_max.shape).astype(jnp.float32)
    count = jnp.maximum(keep.sum(), 1.0)
    return (row_max * keep).sum() / count, (row_entropy * keep).sum() / count


def attention_statistics(
    head_dim: int,
    scale: float,
    *,
    seq_len: int = 256,
    batch: int = 2,
    heads: int = 4,
    seeds: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Softmax statistics of dense attention on standard normal q, k, v ``[B, T, N, H]``.

    Returns the mean over ``seeds`` draws of ``max_weight``, ``entropy`` (nats),
    ``grad_norm`` (per-query L2 norm of ``d sum(out * dout) / dq``, averaged)
    and ``logit_std``, the spread across draws as ``*_std``, and
    ``entropy_uniform = log(seq_len)``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import efficient_attn as ea

    def loss(q, k, v, dout):
        return (ea.attention(q, k, v, method="dense", scale=scale) * dout).sum()

    @jax.jit
    def draw(q, k, v, dout):
        weights = ea.attention_weights(q, k, method="dense", scale=scale)  # [B, N, T, T]
        dq = jax.grad(loss)(q, k, v, dout)  # [B, T, N, H]
        logits = scale * jnp.einsum("btnh,bsnh->bnts", q, k)
        return jnp.stack(
            [*_softmax_stats(weights), jnp.linalg.norm(dq, axis=-1).mean(), logits.std()]
        )

    rng = np.random.default_rng(seed)
    shape = (4, batch, seq_len, heads, head_dim)  # q, k, v, dout
    values = np.asarray(
        [np.asarray(draw(*rng.standard_normal(shape, np.float32))) for _ in range(seeds)],
        np.float64,
    )  # [seeds, 4]
    mean, std = values.mean(0), values.std(0)
    return {
        "max_weight": float(mean[0]),
        "max_weight_std": float(std[0]),
        "entropy": float(mean[1]),
        "entropy_std": float(std[1]),
        "entropy_uniform": math.log(seq_len),
        "grad_norm": float(mean[2]),
        "grad_norm_std": float(std[2]),
        "logit_std": float(mean[3]),
    }


def trained_attention_statistics(
    config: TrainConfig, run_dir: Path
) -> tuple[list[float], list[float]]:
    """Per layer (max weights, entropies) of a trained run's attention on one held-out batch.

    Rows are the scored (query) positions of the batch, all heads; the
    parameters are the run's latest checkpoint.
    """
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    from efficient_attn.nn.attention import MultiHeadAttention
    from efficient_attn.train import EVAL_SEED_OFFSET, Trainer

    trainer = Trainer(config, run_dir)
    manager = trainer.checkpoint_manager()
    try:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    finally:
        manager.close()
    batch = trainer.batch(0, seed=config.seed + EVAL_SEED_OFFSET)

    @jax.jit
    def layer_stats(params, tokens, mask):
        weights = []

        def capture(next_fun, args, kwargs, context):
            if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
                weights.append(context.module.weights(*args, **kwargs))  # [B, N, T, T]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            trainer.model.apply(params, tokens)
        return [_softmax_stats(w, mask) for w in weights]

    stats = layer_stats(state["params"], batch.inputs, batch.mask)
    return [float(m) for m, _ in stats], [float(e) for _, e in stats]


def _measure_trained(payload: dict[str, Any], row: dict[str, Any]) -> None:
    from efficient_attn.train import TrainConfig, train

    config = TrainConfig(**payload["config"])
    run_dir = Path(payload["run"]["run_dir"])
    final = train(config, run_dir, resume=True, progress=False)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    curve = [[r["step"], r["eval_accuracy"]] for r in logged if "eval_accuracy" in r]
    max_weights, entropies = trained_attention_statistics(config, run_dir)
    row.update(
        accuracy=final["accuracy"],
        eval_loss=final["eval_loss"],
        steps=final["step"],
        train_wall_s=final["train_wall_s"],
        curve=curve,
        steps_to_90=next((s for s, a in curve if a >= 0.9), None),
        max_weight=max_weights[-1],
        entropy=entropies[-1],
        max_weight_layers=max_weights,
        entropy_layers=entropies,
    )


def measure(payload: dict[str, Any], row: dict[str, Any]) -> None:
    """Fill a random-input row with softmax statistics, or train and evaluate a model."""
    if payload["kind"] == "trained":
        _measure_trained(payload, row)
        return
    stats = attention_statistics(
        payload["head_dim"],
        payload["scale"],
        seq_len=payload["seq_len"],
        batch=payload["batch"],
        heads=payload["heads"],
        seeds=payload["seeds"],
        seed=payload["seed"],
    )
    if not all(math.isfinite(v) for v in stats.values()):
        raise FloatingPointError(f"non-finite statistics: {stats}")
    row.update(stats)
