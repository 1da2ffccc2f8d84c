"""The sqrt(d) scaling ablation: softmax statistics and trainability under three scale rules.

Rules (logit scale as a function of the head dim d): ``1/sqrt(d)`` (the
Transformer's), ``1`` and ``1/d``.

``kind = "random"`` rows: q, k, v and a cotangent ``dout``, all
``[B, T, N, d]`` with standard normal entries (so ``q·k`` has variance d),
over ``seeds`` draws (averaged; ``*_std`` fields are the spread across draws).
Non-causal dense softmax attention with ``scale = rule(d)``:

* ``max_weight``: max over keys of each softmax row, averaged over rows;
* ``entropy``: softmax row entropy in nats, averaged over rows
  (``entropy_uniform = log T`` is the maximum);
* ``grad_norm``: the gradient of ``loss = sum(out * dout)`` with respect to q,
  as the L2 norm over d of each query's gradient ``dq[b, t, n, :]``, averaged
  over (b, t, n);
* ``logit_std``: standard deviation of the logits ``scale * q·k``
  (``scale * sqrt(d)`` in expectation).

``kind = "trained"`` rows: a :class:`efficient_attn.nn.DecoderLM` trained on
MQAR with :func:`efficient_attn.train.train` under ``scale = rule(d)``, with
``d_model = num_heads * d`` (the ``[train]`` table sets the other
:class:`efficient_attn.train.TrainConfig` fields). Runs live in
``OUT/runs/<rule>-h<d>-seed<s>-<digest>/`` and resume if killed. Fields:
held-out ``accuracy`` and ``eval_loss`` at the end, the held-out accuracy
``curve`` (``[step, accuracy]`` at every evaluation) and ``steps_to_90`` (the
first evaluated step with accuracy >= 0.9, None if never), and the trained
model's attention on one held-out batch at the scored (query) positions:
``max_weight``/``entropy`` of its last layer (``*_layers``: every layer).
``grad_norm`` is None for trained rows.

Modules: :mod:`~efficient_attn.studies.scale_ablation.points` (rules,
settings, points), :mod:`~efficient_attn.studies.scale_ablation.measure` (the
worker side) and :mod:`~efficient_attn.studies.scale_ablation.report`
(tables, summary, plots); :data:`STUDY` is the record that joins them.
"""

from __future__ import annotations

from efficient_attn.studies.base import Study
from efficient_attn.studies.scale_ablation.measure import (
    attention_statistics,
    measure,
    trained_attention_statistics,
)
from efficient_attn.studies.scale_ablation.points import (
    FLAGS,
    MEASUREMENTS,
    RULES,
    SETTINGS,
    points,
    rule_names,
    train_config,
)
from efficient_attn.studies.scale_ablation.report import describe, report, summary

__all__ = [
    "FLAGS",
    "MEASUREMENTS",
    "RULES",
    "SETTINGS",
    "STUDY",
    "attention_statistics",
    "describe",
    "measure",
    "points",
    "report",
    "rule_names",
    "summary",
    "train_config",
    "trained_attention_statistics",
]


STUDY = Study(
    name="scale_ablation",
    settings=SETTINGS,
    flags=FLAGS,
    measurements=MEASUREMENTS,
    points=points,
    measure=measure,
    report=report,
    summary=summary,
    describe=describe,
)
