"""``efficient-attn sweep --status DIR``: where a sweep or study directory stands.

Reads only the directory: the point list the harness writes to
``DIR/sweep.json``, the rows of ``DIR/results*.jsonl`` and the claims in
``DIR/.claims`` (:mod:`efficient_attn.sweep.claims`). Each listed point is in
one of four states: *running* (a live process holds its claim), *done* (its
latest row is ``ok`` or ``unsupported``), *failed* (``error`` or ``oom``) or
*left*. The ETA scales the finished rows' ``worker_s`` (``wall_s`` for the
quality grid) by sequence length (:func:`efficient_attn.sweep.harness.estimate`)
and divides by the number of processes running.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

from efficient_attn.sweep import claims, results
from efficient_attn.sweep.harness import estimate, fmt_duration

DONE = ("ok", "unsupported")


@dataclasses.dataclass
class Status:
    """A results directory's points by state (rows, claims and point dicts)."""

    out_dir: Path
    name: str
    points: list[dict[str, Any]] | None  # None: no point list in sweep.json
    done: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    running: list[claims.Claim]
    left: list[dict[str, Any]]
    dead: list[tuple[claims.Claim, str]]  # claims a new run takes over, and why
    other_rows: int  # rows of keys not in the point list
    eta_s: float | None
    processes: int
    timed: int  # finished rows the ETA is based on


def _seconds(row: dict[str, Any]) -> float | None:
    value = row.get("worker_s", row.get("wall_s"))
    return float(value) if isinstance(value, int | float) and not row.get("skipped") else None


def status(out_dir: str | Path) -> Status:
    """The state of every point in ``out_dir`` (a sweep, study or quality-grid directory)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a directory; --status takes a results directory")
    meta = results.sweep_meta([out_dir])
    points = meta.get("point_list")
    latest = results.latest_rows(out_dir)
    now = time.time()
    live, dead = [], []
    for claim in claims.list_claims(out_dir):
        reason = claim.dead(now)
        (live if reason is None else dead).append((claim, reason))
    running = {c.key: c for c, _ in live}
    listed = points if points is not None else [{"key": k} for k in {*latest, *running}]
    done, failed, left = [], [], []
    for point in listed:
        if point["key"] in running:
            continue
        row = latest.get(point["key"])
        if row is None:
            left.append(point)
        else:
            (done if row["status"] in DONE else failed).append(row)
    seconds: dict[int, list[float]] = {}
    for row in latest.values():
        if _seconds(row) is not None:
            seconds.setdefault(int(row.get("seq_len") or 0), []).append(_seconds(row))
    known = {p["key"]: p for p in listed}
    work = estimate(seconds, [int(p.get("seq_len") or 0) for p in left])
    for claim in running.values():
        length = int(known.get(claim.key, {}).get("seq_len") or 0)
        one = estimate(seconds, [length])
        if work is not None and one is not None:
            work += max(0.0, one - (now - claim.started))
    processes = len({(c.machine, c.pid) for c in running.values()})
    return Status(
        out_dir=out_dir,
        name=str(meta.get("name") or out_dir.name),
        points=points,
        done=done,
        failed=failed,
        running=list(running.values()),
        left=left,
        dead=[(c, r) for c, r in dead if c.key not in running and c.key not in latest],
        other_rows=len(set(latest) - set(known)) if points is not None else 0,
        eta_s=None if work is None else work / max(processes, 1),
        processes=processes,
        timed=sum(len(s) for s in seconds.values()),
    )


def _counts(rows: list[dict[str, Any]]) -> str:
    counts = Counter(r["status"] for r in rows)
    skipped = sum(1 for r in rows if r.get("skipped"))
    text = ", ".join(f"{s} {n}" for s, n in counts.most_common())
    return f"  ({text}{f'; {skipped} not run: infeasible at a shorter length' if skipped else ''})"


def render(s: Status) -> str:
    """The status as a few lines of text."""
    n = len(s.points or ())
    total = "an unknown number of points" if s.points is None else f"{n} point{'s' * (n != 1)}"
    lines = [f"{s.out_dir}: {s.name!r}, {total}"]
    lines.append(f"  done    {len(s.done):5d}" + (_counts(s.done) if s.done else ""))
    lines.append(f"  failed  {len(s.failed):5d}" + (_counts(s.failed) if s.failed else ""))
    by = f"  by {s.processes} process{'es' * (s.processes != 1)}" if s.running else ""
    lines.append(f"  running {len(s.running):5d}{by}")
    now = time.time()
    for c in s.running:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.started))
        lines.append(
            f"    {c.label}: {c.host} pid {c.pid}, since {since} "
            f"({fmt_duration(now - c.started)}), heartbeat {now - c.heartbeat:.0f} s ago"
        )
    if s.points is None:
        lines.append("  left        ?  (no point list in sweep.json: written by older versions)")
    else:
        lines.append(f"  left    {len(s.left):5d}")
    for c, reason in s.dead:
        lines.append(f"    {c.label}: claim of {c.host} pid {c.pid} is dead ({reason}); "
                     "the next run takes it over")  # fmt: skip
    if s.other_rows:
        lines.append(f"  ({s.other_rows} rows of points not in the current point list)")
    if s.eta_s is None:
        eta = "?  (no finished point timed yet)" if (s.left or s.running) else "0:00"
    else:
        at = f"{s.processes} process{'es' * (s.processes != 1)}" if s.processes else "1 process"
        eta = f"{fmt_duration(s.eta_s)} at {at} (from {s.timed} timed points)"
    lines.append(f"  ETA     {eta}")
    return "\n".join(lines)
