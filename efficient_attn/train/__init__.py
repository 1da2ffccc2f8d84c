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

Modules: :mod:`~efficient_attn.train.config` (:class:`TrainConfig`, per-task
defaults), :mod:`~efficient_attn.train.trainer` (:class:`Trainer`: model,
optimizer, jitted steps, evaluation, checkpoint manager),
:mod:`~efficient_attn.train.speed` (throughput), :mod:`~efficient_attn.train.loop`
(:func:`train`) and :mod:`~efficient_attn.train.command` (``efficient-attn
train``: flags, :func:`config_from_args`, :func:`run`).
"""

from __future__ import annotations

from efficient_attn.train.command import (
    add_arguments,
    config_from_args,
    default_out,
    run,
)
from efficient_attn.train.config import (
    TASK_DEFAULTS,
    TASK_SETTINGS,
    TrainConfig,
)
from efficient_attn.train.loop import train
from efficient_attn.train.speed import compiled_flops, throughput
from efficient_attn.train.trainer import (
    EVAL_SEED_OFFSET,
    MODELS,
    Trainer,
    masked_metrics,
)

__all__ = [
    "EVAL_SEED_OFFSET",
    "MODELS",
    "TASK_DEFAULTS",
    "TASK_SETTINGS",
    "TrainConfig",
    "Trainer",
    "add_arguments",
    "compiled_flops",
    "config_from_args",
    "default_out",
    "masked_metrics",
    "run",
    "throughput",
    "train",
]
