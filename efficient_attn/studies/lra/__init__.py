"""Long Range Arena (Tay et al. 2020) side by side: its efficiency table and ListOps.

``lra_efficiency`` (``experiments/lra_efficiency.toml``) is LRA's Table 2 on
our models: training steps per second and peak memory of each method relative
to dense attention at 1K-4K tokens. One point per (method, length) compiles
and times a training step (AdamW) of a :class:`efficient_attn.nn.Classifier`
on random bytes (the cost does not depend on the data); steps/s is one over
the median of ``repeats`` timed steps after ``warmup`` ones
(``block_until_ready``), memory is XLA's compiled temp + argument + output
bytes of that step (``compile().memory_analysis()``). Ratios are taken
against dense at the same length in the same run, never absolute times.

``listops`` (``experiments/listops.toml``, ``experiments/listops_lra.toml``)
trains the classifier on :class:`efficient_attn.tasks.ListOps` with each
method and puts held-out accuracy beside LRA's Table 1 ListOps column.

Modules: :mod:`~efficient_attn.studies.lra.paper` (LRA's published numbers),
:mod:`~efficient_attn.studies.lra.points` (settings, points),
:mod:`~efficient_attn.studies.lra.measure` (timing a training step) and
:mod:`~efficient_attn.studies.lra.report` (tables and summaries);
:data:`LRA_EFFICIENCY` and :data:`LISTOPS` are the records that join them.
"""

from __future__ import annotations

from efficient_attn.studies.base import (
    TRAINED_MEASUREMENTS,
    Study,
    describe_trained,
    measure_trained,
)
from efficient_attn.studies.lra.measure import measure_efficiency
from efficient_attn.studies.lra.paper import (
    LRA_NAMES,
    PAPER_LENGTHS,
    PAPER_LISTOPS,
    PAPER_MEMORY,
    PAPER_STEPS,
    SOURCE,
    TRANSCRIPTION,
)
from efficient_attn.studies.lra.points import (
    EFFICIENCY_MEASUREMENTS,
    EFFICIENCY_SETTINGS,
    LISTOPS_SETTINGS,
    efficiency_points,
    listops_points,
)
from efficient_attn.studies.lra.report import (
    efficiency_describe,
    efficiency_report,
    efficiency_summary,
    efficiency_tables,
    listops_report,
    listops_summary,
    listops_table,
)

__all__ = [
    "EFFICIENCY_MEASUREMENTS",
    "EFFICIENCY_SETTINGS",
    "LISTOPS",
    "LISTOPS_SETTINGS",
    "LRA_EFFICIENCY",
    "LRA_NAMES",
    "PAPER_LENGTHS",
    "PAPER_LISTOPS",
    "PAPER_MEMORY",
    "PAPER_STEPS",
    "SOURCE",
    "TRANSCRIPTION",
    "efficiency_describe",
    "efficiency_points",
    "efficiency_report",
    "efficiency_summary",
    "efficiency_tables",
    "listops_points",
    "listops_report",
    "listops_summary",
    "listops_table",
    "measure_efficiency",
]

LRA_EFFICIENCY = Study(
    name="lra_efficiency",
    settings=EFFICIENCY_SETTINGS,
    flags={"methods": "methods", "seq_lens": "seq_lens", "batch": "batch", "repeats": "repeats"},
    measurements=EFFICIENCY_MEASUREMENTS,
    points=efficiency_points,
    measure=measure_efficiency,
    report=efficiency_report,
    summary=efficiency_summary,
    describe=efficiency_describe,
)


LISTOPS = Study(
    name="listops",
    settings=LISTOPS_SETTINGS,
    flags={"methods": "methods"},
    measurements=TRAINED_MEASUREMENTS,
    points=listops_points,
    measure=measure_trained,
    report=listops_report,
    summary=listops_summary,
    describe=describe_trained,
)
