"""What every study shares: its record, preset settings, the resumable run loop and rows.

A study is a :class:`Study` record: the preset keys it reads (with defaults),
the ``efficient-attn sweep`` flags it honours, ``points(settings, out_dir)``
giving one payload per measurement, ``measure(payload, row)`` filling a row
in a fresh worker process (:mod:`efficient_attn.studies.worker`), and
``report(rows, out_dir)`` writing its tables and plots. The run loop is the
sweep's (:func:`efficient_attn.sweep.harness.run_points`): rows are appended
to ``DIR/results.jsonl`` with ``fsync``, keyed by a stable ``key`` that
re-runs skip; each point runs in its own process
(:func:`efficient_attn.sweep.runner.run_worker`), where a crash, kill or
timeout still becomes a row.

Every row has ``experiment`` (the study's name), ``key``, ``status`` (``ok``,
``unsupported``, ``oom``, ``error``), ``message``, the point's identity, all of
the study's measurement fields (None where not measured), ``env``
(:func:`efficient_attn.sweep.worker.environment`), ``worker_s`` and ``skipped``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from efficient_attn.sweep import harness, runner
from efficient_attn.sweep.spec import AXIS_TABLE

WORKER = (sys.executable, "-m", "efficient_attn.studies.worker")

#: Preset keys every study reads, with defaults.
COMMON_SETTINGS: dict[str, Any] = {"description": "", "note": "", "timeout_s": 600.0}
#: ``efficient-attn sweep`` flags (argparse dests) a study may honour.
SWEEP_FLAGS: tuple[str, ...] = (*(a.flag for a in AXIS_TABLE if a.flag), "repeats", "shard")
#: Flags every study honours.
COMMON_FLAGS: tuple[str, ...] = ("--out", "--timeout", "--retry-errors", "--no-report", "--dry-run")


class Unsupported(Exception):
    """The point cannot run with this method or on this platform; the message says why."""


@dataclasses.dataclass(frozen=True)
class Study:
    """One study: its settings, how to expand them into points, measure and report them.

    Attributes:
      name: the ``study`` key of its presets and the ``experiment`` field of its rows.
      settings: preset keys and their defaults (besides :data:`COMMON_SETTINGS`).
      flags: sweep flag dest -> the setting it overrides; other flags are refused.
      measurements: row fields filled by ``measure`` (None until measured).
      points: ``points(settings, out_dir) -> payloads``; a payload holds the
        row identity (``key``, ``label``, ...) and under ``"run"`` what the
        worker needs besides.
      measure: ``measure(payload, row)`` fills ``row`` in the worker; raises
        :class:`Unsupported` where the point cannot run.
      report: ``report(rows, out_dir) -> (markdown lines, LaTeX tables, files)``.
      summary: ``summary(rows)``: the "what it shows" sentence, from the data.
      describe: ``describe(row)``: a few words on a finished ok row (progress log).
    """

    name: str
    settings: Mapping[str, Any]
    flags: Mapping[str, str]
    measurements: tuple[str, ...]
    points: Callable[[Mapping[str, Any], Path], list[dict[str, Any]]]
    measure: Callable[[dict[str, Any], dict[str, Any]], None]
    report: Callable[[list[dict[str, Any]], Path], tuple[list[str], list[str], list[Path]]]
    summary: Callable[[list[dict[str, Any]]], str]
    describe: Callable[[dict[str, Any]], str]


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def settings_of(
    study: Study, name: str, data: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The study's defaults, overridden by preset ``data``, then by ``overrides``."""
    valid = {**COMMON_SETTINGS, **study.settings}
    unknown = sorted(set(data) - set(valid) - {"study"})
    if unknown:
        raise ValueError(
            f"preset {name!r}: unknown key(s) {unknown} for study {study.name!r}; "
            f"valid keys: study, {', '.join(valid)}"
        )
    settings = {**valid, **{k: v for k, v in data.items() if k != "study"}}
    for key, value in overrides.items():
        if key == "options":
            merged = {m: dict(o) for m, o in settings["options"].items()}
            for method, opts in value.items():
                merged[method] = {**merged.get(method, {}), **opts}
            settings["options"] = merged
        else:
            settings[key] = value
    timeout = settings["timeout_s"]
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout_s={timeout!r} must be a positive number of seconds")
    return settings


def overrides_from_flags(study: Study, given: Mapping[str, Any]) -> dict[str, Any]:
    """Setting overrides from the sweep flags that were given (dest -> value).

    A flag the study does not use is an error, never silently ignored.
    """
    given = {d: v for d, v in given.items() if v is not None and v != []}
    unused = [d for d in given if d in SWEEP_FLAGS and d not in study.flags]
    if unused:
        honoured = [flag_name(d) for d in study.flags] + list(COMMON_FLAGS)
        raise ValueError(
            f"{', '.join(flag_name(d) for d in unused)} not used by study {study.name!r}; "
            f"it honours {', '.join(honoured)}"
        )
    out = {study.flags[d]: v for d, v in given.items() if d in study.flags}
    if given.get("timeout") is not None:
        out["timeout_s"] = given["timeout"]
    return out


def positive_number(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number")
    return float(value)


def new_row(study: Study, payload: Mapping[str, Any], status: str, message: str = "") -> dict:
    """A row of ``payload``'s point with every measurement field present (None)."""
    identity = {k: v for k, v in payload.items() if k not in ("run", "label")}
    return {
        **identity,
        "status": status,
        "message": message,
        **dict.fromkeys(study.measurements),
        "worker_s": None,
        "skipped": False,
        "env": None,
    }


def run_points(
    study: Study,
    name: str,
    settings: Mapping[str, Any],
    out_dir: str | Path,
    *,
    retry_errors: bool = False,
    stream: TextIO | None = sys.stderr,
    meta: Mapping[str, Any] | None = None,
    command: Sequence[str] = WORKER,
) -> harness.Outcome:
    """Run the study's points not yet in ``out_dir``, one worker process each
    (:func:`efficient_attn.sweep.harness.run_points`).

    Points whose key has a row are skipped (``retry_errors``: unless that row
    is an ``error``). A point whose ``family`` ran out of memory or time at a
    shorter ``seq_len`` is recorded with that status without running.
    """
    points = study.points(settings, Path(out_dir))

    def execute(payload: dict[str, Any]) -> dict[str, Any]:
        row = runner.run_worker(payload, float(settings["timeout_s"]), command)
        if row.get("experiment") != study.name:  # the worker died: the runner's sweep row
            dead = new_row(study, payload, row["status"], row["message"])
            dead["worker_s"] = row["worker_s"]
            return dead
        return row

    executor = harness.Executor(
        execute=execute,
        new_row=lambda payload, status, message: new_row(study, payload, status, message),
        describe=study.describe,
        timeout_s=float(settings["timeout_s"]),
    )
    return harness.run_points(
        points,
        out_dir,
        executor,
        name=f"study {study.name!r} ({name})",
        retry_errors=retry_errors,
        stream=stream,
        meta={**(meta or {}), "name": name, "study": study.name, "points": len(points), **settings},
    )


def method_list(settings: Mapping[str, Any]) -> list[str]:
    """The preset's ``methods`` checked against the registry (``"all"``: every available one).

    A name that is not registered is a :class:`ValueError` listing the registered methods.
    """
    import efficient_attn as ea
    from efficient_attn.sweep.spec import as_list, check_methods

    names = settings["methods"]
    if names == "all":
        return [m for m in ea.methods() if ea.get_method(m).available() is None]
    return check_methods(as_list("methods", names), list(ea.methods()))


def train_config(table: Mapping[str, Any], **fields: Any) -> Any:
    """A validated :class:`efficient_attn.train.TrainConfig` from a preset's ``[train]`` table
    (task defaults first), overridden by ``fields``; unknown keys are a :class:`ValueError`."""
    from efficient_attn.train import TrainConfig

    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {**dict(table), **fields}
    unknown = sorted(set(merged) - valid)
    if unknown:
        raise ValueError(
            f"[train] key(s) {unknown} unknown; valid keys: {', '.join(sorted(valid))}"
        )
    task = merged.pop("task", TrainConfig.task)
    config = TrainConfig.for_task(task, **merged)
    config.validate()
    return config


def trained_point(
    experiment: str, key: str, label: str, config: Any, out_dir: Path, **identity: Any
) -> dict[str, Any]:
    """A payload that trains ``config`` in ``OUT/runs/<name>-<digest>/`` (resumed if killed)."""
    fields = dataclasses.asdict(config)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = Path("runs") / f"{identity.get('method', 'run')}-{digest}"
    return {
        "experiment": experiment,
        "key": f"{key}|{digest}",
        "label": label,
        **identity,
        "run_dir": str(run_dir),
        "config": fields,
        "run": {"run_dir": str(Path(out_dir).absolute() / run_dir)},
    }


#: Row fields :func:`measure_trained` fills.
TRAINED_MEASUREMENTS: tuple[str, ...] = (
    "accuracy",
    "eval_loss",
    "steps",
    "train_wall_s",
    "tokens_per_s",
    "step_ms_median",
    "flops_per_step",
    "matmul_flop_s",
    "flop_utilisation",
    "curve",
    "majority_accuracy",
)


def measure_trained(payload: dict[str, Any], row: dict[str, Any]) -> None:
    """Train (or finish training) the payload's run; its held-out accuracy and throughput."""
    from efficient_attn.train import TrainConfig, train

    run_dir = Path(payload["run"]["run_dir"])
    final = train(TrainConfig(**payload["config"]), run_dir, resume=True, progress=False)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    row.update({k: final.get(k) for k in TRAINED_MEASUREMENTS if k in final})
    row.update(
        steps=final["step"],
        curve=[[r["step"], r["eval_accuracy"]] for r in logged if "eval_accuracy" in r],
    )


def describe_trained(row: dict[str, Any]) -> str:
    """A few words on a finished trained row (progress log)."""
    return f"accuracy {row['accuracy']:.3f}, {row.get('tokens_per_s') or 0:,.0f} tokens/s"


def throughput_note(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence: median tokens/s and FLOP utilisation of the ok trained rows."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("tokens_per_s")]
    if not ok:
        return ""
    tps = sorted(r["tokens_per_s"] for r in ok)
    util = sorted(r["flop_utilisation"] for r in ok if r.get("flop_utilisation") is not None)
    text = f"Training throughput: {tps[0]:,.0f}-{tps[-1]:,.0f} tokens/s"
    if util:
        rates = sorted(r["matmul_flop_s"] for r in ok if r.get("matmul_flop_s"))
        median = util[len(util) // 2]
        where = f" ({rates[0] / 1e9:.0f}-{rates[-1] / 1e9:.0f} GFLOP/s)" if rates else ""
        text += (
            f"; {100 * util[0]:.1f}-{100 * util[-1]:.1f}% (median {100 * median:.1f}%) of the "
            f"matmul rate measured in the same processes{where}"
        )
        if median > 0.5:
            text += ", so the runs are mostly compute-bound."
        elif median >= 0.25:
            text += (
                ": small matmuls, elementwise work and the recurrences' scans take the rest "
                "(the rate is the same-process 1024^3 matmul, itself noisy under load)."
            )
        else:
            text += ", so the runs are far from compute-bound (overheads dominate)."
    return text
