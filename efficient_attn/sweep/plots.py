"""Log-log figures of sweep results: one line per method, failed points marked.

Lines are coloured by family, with a shade, marker and dash per method, and the
legend groups them under family headings (:mod:`efficient_attn.sweep.styles`);
:func:`family_panels_figure` draws a panel per family with ``dense`` and
``xla`` repeated as references. Uses matplotlib's object API (``Figure``), so no
pyplot state or GUI backend is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from efficient_attn.core.registry import FAMILIES
from efficient_attn.sweep.results import BASELINES, TIME, Metric, PanelData, rel_error, time_ms
from efficient_attn.sweep.styles import Style, family_legend, styles


def _length_label(t: int) -> str:
    if t >= 2**20 and t % 2**20 == 0:
        return f"{t // 2**20}M"
    if t >= 1024 and t % 1024 == 0:
        return f"{t // 1024}K"
    return str(t)


_FAILED = (("oom", "x", "out of memory"), ("error", "+", "failed"))


def _draw(
    ax: Axes, data: PanelData, name: str, metric: Metric, style: Style, label: str, **line: Any
) -> tuple[Any, set[str]]:
    """One variant's line (min-max bars for time) and its failed points marked at the top.

    Returns its legend handle (the failure marker when no point ran; None when
    nothing was drawn), labelled ``label``, and the failure statuses it marked.
    """
    points = [(t, data.cells.get((name, t))) for t in data.lengths]
    ok = [(t, metric.value(r), r) for t, r in points if r and r["status"] == "ok"]
    ok = [(t, v, r) for t, v, r in ok if v is not None and v > 0]
    handle, failed = None, set()
    if ok:
        xs, ys = [t for t, _, _ in ok], [v for _, v, _ in ok]
        (handle,) = ax.plot(
            xs, ys, **style.kwargs(), ms=5, lw=line.pop("lw", 1.5), label=label, **line
        )
        if metric is TIME:
            lo = [max(v - (r.get("time_ms_min") or v), 0.0) for _, v, r in ok]
            hi = [max((r.get("time_ms_max") or v) - v, 0.0) for _, v, r in ok]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=style.color, lw=0.8, capsize=2)
    for status, sym, _ in _FAILED:
        xs = [t for t, r in points if r and r["status"] == status]
        if xs:
            failed.add(status)
            (mark,) = ax.plot(
                xs,
                [0.98] * len(xs),
                sym,
                color=style.color,
                ms=9,
                mew=2,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                label=label if handle is None else None,
            )
            handle = handle or mark
    return handle, failed


def _axes(ax: Axes, data: PanelData, metric: Metric) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(data.lengths, [_length_label(t) for t in data.lengths])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel(f"{metric.caption.lower()} ({metric.unit.split(',')[0]})")
    ax.grid(True, which="major", alpha=0.3)


def _failed_entries(failed: set[str]) -> list[tuple[Line2D, str]]:
    return [
        (Line2D([], [], ls="", marker=sym, color="k", ms=8, mew=2), f"{what} (marked at top)")
        for status, sym, what in _FAILED
        if status in failed
    ]


def _styles(data: PanelData) -> dict[str, Style]:
    """Styles of the panel's variants that ran or failed somewhere (not only unsupported)."""
    method, drawn = {}, set()
    for (name, _), row in data.cells.items():
        method[name] = row["method"]
        if row["status"] != "unsupported":
            drawn.add(name)
    return styles({name: method[name] for name in data.variants if name in drawn})


def metric_figure(data: PanelData, metric: Metric, device: str) -> Figure | None:
    """Log-log ``metric`` vs sequence length, one line per variant coloured by family.

    The legend lists the variants under a heading per family; None when
    nothing can be drawn.
    """
    lines = _styles(data)
    fig = Figure(figsize=(7.0, max(4.2, 0.16 * (len(lines) + 8))))
    ax = fig.subplots()
    entries, failed = [], set()
    for name, style in lines.items():
        handle, marked = _draw(ax, data, name, metric, style, name)
        failed |= marked
        if handle is not None:
            entries.append((handle, name, style.family))
    if not entries:
        return None
    _axes(ax, data, metric)
    ax.set_title(f"{metric.title} on {device}\n{data.panel.title}", fontsize=9)
    family_legend(
        ax,
        entries,
        _failed_entries(failed),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    return fig


def family_panels_figure(data: PanelData, metric: Metric, device: str) -> Figure | None:
    """``metric`` vs sequence length with one panel per family (shared y axis).

    Every panel repeats the :data:`BASELINES` (``dense``, ``xla``) as
    references, thinner and labelled so; None when nothing can be drawn.
    """
    lines = _styles(data)
    method = {name: row["method"] for (name, _), row in data.cells.items()}
    references = [n for n in lines if method[n] in BASELINES]
    families = [f for f in FAMILIES if any(s.family == f for s in lines.values())]
    if not families:
        return None
    cols = min(len(families), 2)
    rows = -(-len(families) // cols)
    fig = Figure(figsize=(6.4 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    drawn = False
    for ax, family in zip(axes, families, strict=False):
        entries, failed = [], set()
        members = [n for n, s in lines.items() if s.family == family]
        for name in [*members, *(r for r in references if r not in members)]:
            ref = name not in members
            extra = {"lw": 1.0, "alpha": 0.6} if ref else {}
            label = f"{name} (reference)" if ref else name
            handle, marked = _draw(ax, data, name, metric, lines[name], label, **extra)
            failed |= marked
            if handle is not None:
                entries.append((handle, label, lines[name].family))
        drawn = drawn or bool(entries)
        _axes(ax, data, metric)
        ax.set_title(FAMILIES[family], fontsize=9)
        family_legend(ax, entries, _failed_entries(failed), loc="best", fontsize=7)
    for ax in axes[len(families) :]:
        ax.set_visible(False)
    if not drawn:
        return None
    fig.suptitle(
        f"{metric.title} on {device}, by family ({' and '.join(BASELINES)} in every panel)"
        f"\n{data.panel.title}",
        fontsize=9,
    )
    return fig


def save(fig: Figure | None, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem``.png and .pdf (nothing for None)."""
    if fig is None:
        return []
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    return paths


def metric_plot(data: PanelData, metric: Metric, stem: Path, device: str) -> list[Path]:
    """:func:`metric_figure` written as ``stem``.png and .pdf."""
    return save(metric_figure(data, metric, device), stem)


def family_panels_plot(data: PanelData, metric: Metric, stem: Path, device: str) -> list[Path]:
    """:func:`family_panels_figure` written as ``stem``.png and .pdf."""
    return save(family_panels_figure(data, metric, device), stem)


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
