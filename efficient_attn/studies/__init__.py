"""Studies: experiments with their own measurements, run by ``efficient-attn sweep NAME``.

A study preset is a TOML file under ``experiments/`` with a ``study`` key
naming one of :data:`STUDIES` (``experiments/decode.toml``,
``experiments/scale_ablation.toml``); its other keys are that study's settings.
``efficient-attn sweep NAME`` runs it (resumable: rows keyed by ``key`` in
``OUT/results.jsonl``, one fresh worker process per point) and writes its
report; ``efficient-attn report OUT`` rewrites the report, dispatching on the
rows' ``experiment`` field.

* ``decode``: per-token decoding time and KV-cache (or recurrent-state) bytes
  vs context length for MHA, GQA and MQA (:mod:`efficient_attn.studies.decode`).
* ``scale_ablation``: softmax statistics and MQAR trainability under the
  logit scales 1/sqrt(d), 1 and 1/d (:mod:`efficient_attn.studies.scale_ablation`).
* ``lra_efficiency`` and ``listops``: Long Range Arena's efficiency table and
  ListOps accuracy beside ours (:mod:`efficient_attn.studies.lra`).
* ``zoology_mqar``: MQAR accuracy vs model width per sequence length, Zoology's
  Figure 2 (:mod:`efficient_attn.studies.zoology`).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from efficient_attn.studies import decode, lra, scale_ablation, zoology
from efficient_attn.studies.base import (
    SWEEP_FLAGS,
    Study,
    Unsupported,
    overrides_from_flags,
    run_points,
    settings_of,
)
from efficient_attn.sweep import report as sweep_report
from efficient_attn.sweep import runner
from efficient_attn.sweep.spec import experiments_dirs

#: study name -> record (dispatch is this table).
STUDIES: dict[str, Study] = {
    s.name: s
    for s in (decode.STUDY, scale_ablation.STUDY, lra.LRA_EFFICIENCY, lra.LISTOPS, zoology.STUDY)
}

__all__ = [
    "STUDIES",
    "Study",
    "Unsupported",
    "available_presets",
    "experiment_of",
    "find_preset",
    "run",
    "run_from_args",
    "write_report",
]


def _study_data(path: Path) -> dict[str, Any] | None:
    """The preset's data if ``path`` parses and has a ``study`` key, else None."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return data if "study" in data else None


def available_presets() -> dict[str, Path]:
    """Study preset name -> file, first match along the sweep's ``experiments`` dirs."""
    found: dict[str, Path] = {}
    for d in experiments_dirs():
        for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
            if path.stem not in found and _study_data(path) is not None:
                found[path.stem] = path
    return found


def find_preset(name_or_path: str) -> tuple[str, dict[str, Any]] | None:
    """(name, data) of a study preset given by name or ``.toml`` path; None if not a study."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = available_presets().get(name_or_path)
        if path is None:
            return None
    data = _study_data(path)
    if data is None:
        return None
    if data["study"] not in STUDIES:
        raise ValueError(f"{path}: study={data['study']!r}; valid studies: {', '.join(STUDIES)}")
    return path.stem, data


def run(
    name: str,
    data: Mapping[str, Any],
    out_dir: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    retry_errors: bool = False,
    report: bool = True,
    stream: TextIO | None = sys.stderr,
    meta: Mapping[str, Any] | None = None,
) -> runner.Outcome:
    """Run the study preset ``data`` (settings overridden by ``overrides``) into ``out_dir``."""
    study = STUDIES[data["study"]]
    settings = settings_of(study, name, data, overrides or {})
    outcome = run_points(
        study, name, settings, out_dir, retry_errors=retry_errors, stream=stream, meta=meta
    )
    if report:
        write_report([out_dir])
    return outcome


def run_from_args(name: str, data: Mapping[str, Any], args: Any) -> int:
    """``efficient-attn sweep STUDY_PRESET [flags]``: run (or ``--dry-run`` list) the points."""
    import efficient_attn as ea
    from efficient_attn.sweep.spec import parse_option_flags

    study = STUDIES[data["study"]]
    given = {d: getattr(args, d, None) for d in (*SWEEP_FLAGS, "timeout")}
    overrides = overrides_from_flags(study, given)
    if "options" in overrides:
        registry = {m: ea.get_method(m).options for m in ea.methods()}
        overrides["options"] = parse_option_flags(overrides["options"], registry)
    out = Path(args.out or Path("runs") / name)
    settings = settings_of(study, name, data, overrides)
    if args.dry_run:
        points = study.points(settings, out)
        for p in points:
            print(p["key"])
        print(f"{len(points)} points", file=sys.stderr)
        return 0
    try:
        outcome = run(
            name,
            data,
            out,
            overrides=overrides,
            retry_errors=args.retry_errors,
            report=False,
            meta={"command": ["efficient-attn", *getattr(args, "argv", [])]},
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished rows are in {out}; run the same command to resume")
        return 130
    counts = ", ".join(f"{n} {s}" for s, n in outcome.statuses.most_common()) or "nothing new"
    print(f"ran {outcome.ran} points ({counts}), skipped {outcome.skipped} already done")
    if outcome.elsewhere:
        print(f"{outcome.elsewhere} still running in other processes (see --status {out}); "
              "the last to finish writes the report")  # fmt: skip
    elif not args.no_report:
        write_report([out])
        rows = runner.merge_rows([out])
        print(f"report: {out / 'report.md'}\n\n{study.summary(rows)}")
    return 0


def experiment_of(paths: Sequence[str | Path]) -> str | None:
    """The study whose rows are under ``paths``, or None for sweep rows.

    Rows of several studies, or of a study and a sweep, are an error.
    """
    files = [f for p in paths for f in runner.results_files(p)]
    kinds = {row.get("experiment") for f in files for row in runner.read_rows(f)}
    studies = kinds & set(STUDIES)
    if not studies:
        return None
    if len(kinds) > 1:
        names = ", ".join(sorted("sweep" if k is None else str(k) for k in kinds))
        raise ValueError(f"rows of different experiments ({names}) cannot share a report")
    return studies.pop()


def write_report(paths: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Merge the study rows under ``paths``; write report.md, report.tex and the plots."""
    rows = runner.merge_rows(paths)
    name = experiment_of(paths)
    if name is None:
        raise ValueError(f"no study rows in {', '.join(map(str, paths))}")
    study = STUDIES[name]
    out = Path(out_dir if out_dir is not None else paths[0])
    out = out.parent if out.suffix == ".jsonl" else out
    out.mkdir(parents=True, exist_ok=True)
    meta = sweep_report.sweep_meta(paths)
    body, tex, files = study.report(rows, out)
    notes = [
        f"- **{r['key']}** {r['status']}: "
        + (str(r.get("message") or "").splitlines() or [""])[0][:300]
        for r in rows
        if r["status"] != "ok"
    ]
    title = f"Study: {name} ({meta.get('name', out.name)})"
    md = [
        *sweep_report.header_lines(title, meta, rows, paths),
        *body,
        *(["", "## Points that did not run", "", *notes] if notes else []),
    ]
    (out / "report.md").write_text("\n".join(md).rstrip() + "\n")
    (out / "report.tex").write_text("\n".join(tex))
    return [out / "report.md", out / "report.tex", *files]
