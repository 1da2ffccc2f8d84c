"""Decoding cost: one new token against a KV cache, for MHA, GQA and MQA.

Per point (method, K/V heads K, context length L): the cache holds L
positions, ``k_cache, v_cache: [B, L, K, H]`` (capacity == context, so the
attended length is L without ``kv_lengths``). One decoding step writes the new
token's ``k_new, v_new: [B, 1, K, H]`` into the last slot with
``jax.lax.dynamic_update_slice`` (the cache buffers are donated, so the write
is in place) and attends with ``q: [B, 1, N, H]`` through
``ea.attention(q, k_cache, v_cache, method=m, causal=True)``: bottom-right
causal, the one query sees all L keys. ``cache_bytes`` is the sum of the cache
arrays' ``.nbytes``.

Methods with a recurrent form on their registry entry (``Method.recurrent``:
the linear and the gated/delta-rule methods, :func:`efficient_attn.recurrent_methods`)
decode from their recurrent state instead: the empty state
(:func:`efficient_attn.linear_init_state`) absorbs L - 1 random context tokens
once (not timed), then one :func:`efficient_attn.linear_step` (absorb the new
token, read out with its query) is timed; ``cache_bytes`` is the state's size,
independent of L. Per-token inputs (``log_decay``, ``beta``) are drawn by the
method's initialisers (``ea.init_arrays``) for the L tokens and passed to each step.

Time: the compiled step is warmed up, then timed ``repeats`` times (fewer
where one step takes more than ``timing_budget_s / repeats``), each call
blocked on with ``block_until_ready``; ``time_ms`` is the median.
``temp_bytes`` is XLA's compiled temporary memory of the step. Methods that
cannot decode (not available here, or lacking the ``causal``/``cross``/``gqa``
features a one-token query over a cache needs) give ``unsupported`` rows.

Modules: :mod:`~efficient_attn.studies.decode.points` (settings, points),
:mod:`~efficient_attn.studies.decode.measure` (the worker-side timing) and
:mod:`~efficient_attn.studies.decode.report` (tables, summary, plots);
:data:`STUDY` is the record that joins them.
"""

from __future__ import annotations

from efficient_attn.studies.base import Study
from efficient_attn.studies.decode.measure import _kv_cache_step as _kv_cache_step
from efficient_attn.studies.decode.measure import _normals as _normals
from efficient_attn.studies.decode.measure import _recurrent_step as _recurrent_step
from efficient_attn.studies.decode.measure import _time_steps as _time_steps
from efficient_attn.studies.decode.measure import measure
from efficient_attn.studies.decode.points import (
    FLAGS,
    MEASUREMENTS,
    SETTINGS,
    attention_kind,
    kv_heads_for,
    points,
)
from efficient_attn.studies.decode.report import describe, report, summary

__all__ = [
    "FLAGS",
    "MEASUREMENTS",
    "SETTINGS",
    "STUDY",
    "attention_kind",
    "describe",
    "kv_heads_for",
    "measure",
    "points",
    "report",
    "summary",
]


STUDY = Study(
    name="decode",
    settings=SETTINGS,
    flags=FLAGS,
    measurements=MEASUREMENTS,
    points=points,
    measure=measure,
    report=report,
    summary=summary,
    describe=describe,
)
