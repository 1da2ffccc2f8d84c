"""Scaling sweeps of speed, memory and approximation error, and their reports.

``spec`` expands presets (``experiments/*.toml``) into points, ``worker``
measures one point in a fresh process, ``runner`` runs a sweep resumably into
``results.jsonl``, ``report`` turns results into markdown, LaTeX and plots.
"""
