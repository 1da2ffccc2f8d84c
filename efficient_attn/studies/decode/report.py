"""The decode study's report: time per token, cache size and temp memory vs context length."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficient_attn.sweep import report as sweep_report


def describe(row: dict[str, Any]) -> str:
    return f"{row['time_ms']:.3g} ms/token, cache {row['cache_bytes'] / 2**20:.3g} MiB"


def _variant(row: dict[str, Any]) -> str:
    return f"{sweep_report.variant(row)} K={row['kv_heads']} ({row['attention']})"


def _panels(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault((r["batch"], r["heads"], r["head_dim"], r["dtype"]), []).append(r)
    return panels


def _cell(row: dict[str, Any] | None, value: Callable[[dict], float]) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return {"oom": "OOM", "unsupported": "n/a"}.get(row["status"], row["status"])
    v = value(row)
    return "n/c" if v is None else sweep_report.fmt_value(v)


def _mib(row: dict[str, Any]) -> float:
    return row["cache_bytes"] / 2**20


def _temp_mib(row: dict[str, Any]) -> float | None:
    return None if row["temp_bytes"] is None else row["temp_bytes"] / 2**20


def _table(rows, value: Callable[[dict], float]) -> tuple[list[str], list[list[str]]]:
    lengths = sorted({r["seq_len"] for r in rows})
    cells: dict[str, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault(_variant(r), {})[r["seq_len"]] = r
    header = ["method (K/V heads)", *(f"{t:,}" for t in lengths), "exponent"]
    body = []
    for name, by_len in cells.items():
        ok = {t: value(r) for t, r in by_len.items() if r["status"] == "ok"}
        ok = {t: v for t, v in ok.items() if v is not None}
        slope = sweep_report.fit_exponent(ok)
        body.append(
            [
                name,
                *(_cell(by_len.get(t), value) for t in lengths),
                "–" if slope is None else f"{slope:.2f}",
            ]
        )
    return header, body


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


def summary(rows: list[dict[str, Any]]) -> str:
    """MHA vs MQA at the longest context per method, and the linear methods' constant state."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "No point ran."
    longest = max(r["seq_len"] for r in ok)
    at = {(r["method"], r["kv_heads"], r["heads"]): r for r in ok if r["seq_len"] == longest}
    parts = []
    for (method, kh, n), mha in at.items():
        mqa = at.get((method, 1, n))
        if kh != n or mqa is None or n == 1:
            continue
        t_ratio = mha["time_ms"] / mqa["time_ms"]
        parts.append(
            f"{method}: MHA (K={n}) {mha['time_ms']:.3g} ms/token with a "
            f"{_fmt_bytes(mha['cache_bytes'])} "
            f"{'state' if mha['decode_form'] != 'kv cache' else 'cache'}, "
            f"MQA (K=1) {mqa['time_ms']:.3g} ms with {_fmt_bytes(mqa['cache_bytes'])} "
            f"({mha['cache_bytes'] / mqa['cache_bytes']:.0f}x smaller, "
            + (f"{t_ratio:.2g}x faster)" if t_ratio >= 1 else f"{1 / t_ratio:.2g}x slower)")
        )
    text = f"At the longest context, {longest:,} tokens: " + "; ".join(parts) + "."
    copies = [
        r
        for r in at.values()
        if r["decode_form"] == "kv cache"
        and r["kv_heads"] == r["heads"]
        and (r["temp_bytes"] or 0) >= 0.9 * r["cache_bytes"]
    ]
    if copies:
        text += (
            " The compiled step of "
            + ", ".join(f"{r['method']} ({_fmt_bytes(r['temp_bytes'])})" for r in copies)
            + " needs temp memory at least 0.9x its MHA cache: the cache is copied every token."
        )
    constant = sorted(
        {
            r["method"]
            for r in ok
            if r["decode_form"] != "kv cache"
            and len({x["cache_bytes"] for x in ok if x["family"] == r["family"]}) == 1
        }
    )
    if constant:
        text += (
            f" The recurrent state of {', '.join(constant)} has the same size at every length, "
            "where a KV cache grows linearly."
        )
    return text


def report(rows: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str], list[Path]]:
    """Time per token and cache size tables (per shape) and their log-log plots."""
    try:
        from efficient_attn.studies import plots
    except ImportError:
        plots = None
    md: list[str] = [
        "Time: median per decoded token (ms) over repeats after warm-up; cache: the K/V "
        "cache arrays' bytes (linear methods: their recurrent state) in MiB. Exponent: "
        f"log-log slope over the {sweep_report.FIT_POINTS} longest lengths. n/a: the method "
        "cannot decode here (see the notes).",
        "",
        f"**What it shows.** {summary(rows)}",
    ]
    tex, files = [], []
    for (b, n, h, dtype), panel in _panels(rows).items():
        title = f"batch {b}, {n} query heads, head dim {h}, {dtype}"
        slug = f"b{b}-n{n}-h{h}-{dtype}"
        md += ["", f"## {title}", ""]
        if plots is not None:
            figure = plots.decode_plot(panel, out / f"decode-{slug}", title)
            files += figure
            md += [f"![decode]({figure[0].name})", ""] if figure else []
        for what, value, unit in (
            ("Time per token", lambda r: r["time_ms"], "ms, median"),
            ("Cache size", _mib, "MiB"),
            ("Compiled temp memory of the step", _temp_mib, "MiB"),
        ):
            header, body = _table(panel, value)
            md += [f"**{what}** ({unit})", "", sweep_report.markdown_table(header, body), ""]
            caption = f"Decoding: {what.lower()} ({unit}) vs context length; {title}."
            tex.append(
                sweep_report.latex_table(header, body, caption, f"tab:decode-{what[:4]}-{slug}")
            )
    return md, tex, files
