"""The experiment harness: scaling sweeps, their results store and reports.

``spec`` expands presets (``experiments/*.toml``) into ``points`` (``Point``,
``Sweep``); ``axes`` declares every axis once (``AXIS_TABLE``) and checks
their values. ``worker`` measures one point in a fresh process (``measure``
holds the measurements, ``protocol`` the row fields and provenance it shares
with the parent), ``harness`` is the one resumable point loop (sweeps, studies
and the quality grid run through it; ``claims`` lets several processes share one
directory, ``status`` reports on one), ``runner`` runs a sweep with it,
``results`` is the store (``results.jsonl``) and the data model that
``report`` (markdown, LaTeX) and ``plots`` both read.
"""
