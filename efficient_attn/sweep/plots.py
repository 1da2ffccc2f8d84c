"""Log-log figures of sweep results: one line per method, failed points marked.

Uses matplotlib's object API (``Figure``), so no pyplot state or GUI backend is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from efficient_attn.sweep.results import TIME, Metric, PanelData, rel_error, time_ms


def _length_label(t: int) -> str:
    if t >= 2**20 and t % 2**20 == 0:
        return f"{t // 2**20}M"
    if t >= 1024 and t % 1024 == 0:
        return f"{t // 1024}K"
    return str(t)


def metric_plot(data: PanelData, metric: Metric, stem: Path, device: str) -> list[Path]:
    """Log-log plot of ``metric`` vs sequence length, one line per method (PNG and PDF)."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"].colors
    styles, markers = ("-", "--", ":"), "osD^v<>pPhX*"
    drawn, failed = 0, {"oom": False, "error": False}
    for i, name in enumerate(data.variants):
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        style = styles[(i // len(colors)) % len(styles)]
        points = [(t, data.cells.get((name, t))) for t in data.lengths]
        ok = [(t, metric.value(r), r) for t, r in points if r and r["status"] == "ok"]
        ok = [(t, v, r) for t, v, r in ok if v is not None and v > 0]
        if ok:
            xs, ys = [t for t, _, _ in ok], [v for _, v, _ in ok]
            ax.plot(xs, ys, marker=marker, ls=style, color=color, label=name, ms=5, lw=1.5)
            if metric is TIME:
                lo = [max(v - (r.get("time_ms_min") or v), 0.0) for _, v, r in ok]
                hi = [max((r.get("time_ms_max") or v) - v, 0.0) for _, v, r in ok]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=color, lw=0.8, capsize=2)
            drawn += 1
        for status, sym in (("oom", "x"), ("error", "+")):
            xs = [t for t, r in points if r and r["status"] == status]
            if xs:
                failed[status] = True
                ax.plot(
                    xs,
                    [0.98] * len(xs),
                    sym,
                    color=color,
                    ms=9,
                    mew=2,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    label=None if ok else name,
                )
    if not drawn and not any(failed.values()):
        return []
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(data.lengths, [_length_label(t) for t in data.lengths])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel(f"{metric.caption.lower()} ({metric.unit.split(',')[0]})")
    ax.set_title(f"{metric.title} on {device}\n{data.panel.title}", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    for status, sym in (("oom", "x"), ("error", "+")):
        if failed[status]:
            what = "out of memory" if status == "oom" else "failed"
            handles.append(Line2D([], [], ls="", marker=sym, color="k", ms=8, mew=2))
            labels.append(f"{what} (marked at top)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    return paths


def _option_value(row: dict[str, Any], option: str) -> float:
    return (row.get("resolved_options") or row.get("options") or {})[option]


def option_plot(
    method: str, option: str, rows: Sequence[dict[str, Any]], stem: Path, title: str, device: str
) -> list[Path]:
    """Error and time vs one option of one method (log-log), one line per sequence length."""
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    ticks = sorted({_option_value(r, option) for r in rows})
    for t in sorted({r["seq_len"] for r in rows}):
        at = sorted(
            ((_option_value(r, option), r) for r in rows if r["seq_len"] == t), key=lambda x: x[0]
        )
        xs = [v for v, _ in at]
        for ax, value in zip(axes, (rel_error, time_ms), strict=True):
            ys = [(x, value(r)) for x, r in zip(xs, (r for _, r in at), strict=True)]
            ys = [(x, y) for x, y in ys if y is not None and y > 0]
            if ys:
                ax.plot(*zip(*ys, strict=True), marker="o", ms=4, label=f"N = {t:,}")
    for ax, label in zip(axes, ("relative error vs float64", "time per call (ms)"), strict=True):
        if ticks[0] > 0:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xscale("symlog", base=2, linthresh=max(min(v for v in ticks if v) / 2, 1e-9))
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(f"{option} ({method})")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{method}: error and time vs {option} on {device}\n{title}", fontsize=9)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    return paths
