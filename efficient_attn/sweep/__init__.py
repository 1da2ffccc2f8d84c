"""The experiment harness: scaling sweeps, their results store and reports.

``spec`` expands presets (``experiments/*.toml``) into points (its
``AXIS_TABLE`` declares every axis once), ``worker`` measures one point in a
fresh process, ``harness`` is the one resumable point loop (sweeps, studies and
the quality grid run through it), ``runner`` runs a sweep with it,
``results`` is the store (``results.jsonl``) and the data model that
``report`` (markdown, LaTeX) and ``plots`` both read.
"""
