"""Work sharing on one results directory: claims, takeover, atomic rows, ``--status``."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import efficient_attn as ea
from efficient_attn import cli
from efficient_attn.sweep import claims, harness, results, runner, spec, status


def _write_claim(out: Path, key: str, pid: int, *, age: float = 0.0, **fields) -> Path:
    """A claim file as another process would have written it, its heartbeat ``age`` s old."""
    path = claims.claim_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "key": key,
        "label": f"label of {key}",
        "host": claims.HOST,
        "machine": claims.MACHINE,
        "pid": pid,
        "pid_started": claims._proc_start(pid),
        "token": f"token-{key}",
        "started": time.time() - age,
        "stale_after_s": 60.0,
        **fields,
    }
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age,) * 2)
    return path


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_live_claims_are_left_alone_and_dead_ones_taken_over(tmp_path):
    me, gone = os.getpid(), _exited_pid()
    _write_claim(tmp_path, "live", me)
    _write_claim(tmp_path, "gone", gone)
    _write_claim(tmp_path, "silent", me, age=61.0)  # alive, but its heartbeat stopped
    _write_claim(tmp_path, "reused", me, pid_started="1")  # the pid now names another process
    _write_claim(tmp_path, "far", gone, machine="other-host")  # pid unknowable: heartbeat only
    _write_claim(tmp_path, "far-silent", gone, machine="other-host", age=61.0)
    claims.claim_path(tmp_path, "torn").write_text("")  # its writer died mid-write
    with claims.Claims(tmp_path, stale_after_s=30.0) as mine:
        assert mine.acquire("live") is None and mine.acquire("far") is None
        reasons = {k: mine.acquire(k).reason for k in ("gone", "silent", "reused", "far-silent")}
        assert reasons["gone"] == f"process {gone} on {claims.HOST} is gone"
        assert reasons["reused"] == f"process {me} on {claims.HOST} is gone"
        assert "no heartbeat for 6" in reasons["silent"] and "no heartbeat" in reasons["far-silent"]
        assert mine.acquire("torn").reason == "unreadable claim"
        assert mine.acquire("new").took_over is None
        assert mine.acquire("new") is None  # held by this live process: not twice
        taken = claims.read_claim(claims.claim_path(tmp_path, "gone"))
        assert (taken.pid, taken.stale_after_s) == (me, 30.0)
    left = {c.key for c in claims.list_claims(tmp_path)}
    assert left == {"live", "far"}  # close() removed exactly its own claims


def test_heartbeat_and_release_never_touch_a_takeover(tmp_path):
    first = claims.Claims(tmp_path, stale_after_s=0.5, heartbeat_s=0.05)
    path = first.acquire("k").path
    os.utime(path, (time.time() - 100,) * 2)
    deadline = time.time() + 5
    while path.stat().st_mtime < time.time() - 10 and time.time() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime > time.time() - 10  # the heartbeat thread refreshed it
    first._stop.set()  # the process freezes: no more heartbeats
    first._thread.join()
    time.sleep(0.6)
    second = claims.Claims(tmp_path, stale_after_s=60.0)
    assert "no heartbeat" in second.acquire("k").reason
    first.close()  # the frozen process wakes up and releases: the takeover stays
    assert claims.read_claim(path).token == second.held["k"].token
    second.close()
    assert not path.exists()


def test_a_zombie_is_dead():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert claims.pid_alive(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while claims.pid_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.01)
        assert not claims.pid_alive(proc.pid)  # killed, not yet reaped
    finally:
        proc.kill()
        proc.wait()


def _executor(execute) -> harness.Executor:
    return harness.Executor(
        execute=execute,
        new_row=lambda p, status, message: {"key": p["key"], "status": status, "message": message},
        describe=lambda row: "",
    )


def test_a_point_recorded_by_another_process_is_never_run_or_recorded_again(tmp_path):
    """Re-checked after claiming (b) and under the results lock before appending (c)."""
    path, ran = tmp_path / results.RESULTS, []

    def execute(point):
        ran.append(point["key"])
        if point["key"] == "a":  # meanwhile another process records b ...
            results.append_row(path, {"key": "b", "status": "ok", "by": "other"})
        if point["key"] == "c":  # ... and c, which this process is running too
            results.append_row(path, {"key": "c", "status": "ok", "by": "other"})
        return {"key": point["key"], "status": "ok", "by": "me", "worker_s": 1.0}

    points = [{"key": k, "label": k} for k in "abc"]
    outcome = harness.run_points(points, tmp_path, _executor(execute), name="t", stream=None)
    assert ran == ["a", "c"] and (outcome.ran, outcome.skipped) == (1, 2)
    rows = results.read_rows(path)
    assert sorted((r["key"], r["by"]) for r in rows) == [
        ("a", "me"),
        ("b", "other"),
        ("c", "other"),
    ]
    assert not list(claims.claims_dir(tmp_path).glob("*.json"))


def test_status_of_done_failed_running_dead_and_left_points(tmp_path, capsys):
    statuses = {"p0": "ok", "p1": "unsupported", "p2": "error"}
    points = [{"key": f"p{i}", "label": f"point {i}", "seq_len": 16 * (i + 1)} for i in range(6)]

    def execute(point):
        return {"key": point["key"], "status": statuses[point["key"]], "worker_s": 2.0,
                "seq_len": point["seq_len"]}  # fmt: skip

    harness.run_points(
        points[:3], tmp_path, _executor(execute), name="t", stream=None, all_points=points
    )
    _write_claim(tmp_path, "p3", os.getpid(), age=5.0)  # running here, 5 s in
    _write_claim(tmp_path, "p4", _exited_pid())  # its process died: left, taken over next run
    s = status.status(tmp_path)
    assert [r["key"] for r in s.done] == ["p0", "p1"] and [r["key"] for r in s.failed] == ["p2"]
    assert [c.key for c in s.running] == ["p3"] and s.processes == 1
    assert [p["key"] for p in s.left] == ["p4", "p5"] and [c.key for c, _ in s.dead] == ["p4"]
    assert s.eta_s is not None and s.eta_s > 0 and s.timed == 3
    assert cli.main(["sweep", "--status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    expected = [
        "done        2  (ok 1, unsupported 1)",
        "failed      1  (error 1)",
        "running     1  by 1 process",
        f"label of p3: {claims.HOST} pid {os.getpid()}",
        "left        2",
        "is gone); the next run takes it over",
        "ETA     0:",
    ]
    assert all(line in text for line in expected), text
    meta = json.loads((tmp_path / "sweep.json").read_text())
    results.write_meta(tmp_path, {k: v for k, v in meta.items() if k != "point_list"})
    assert "left        ?  (no point list" in status.render(status.status(tmp_path))
    assert cli.main(["sweep", "--status", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


_FAKE_WORKER = """
import json, os, sys, time
for line in sys.stdin:
    p = json.loads(line)
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(p["key"] + "\\t" + str(os.getppid()) + "\\n")
    time.sleep(float(os.environ["FAKE_SLEEP"]))
    row = {**p, "status": "ok", "message": "", "time_ms": 1.0, "worker_s": 0.0}
    print(json.dumps(row), flush=True)
"""

# ``efficient-attn sweep ARGS`` with the fake worker, started together: each waits until
# ``argv[2]`` processes have written their pid into the directory ``argv[1]``.
_DRIVER = """
import functools, os, sys, time
from pathlib import Path
from efficient_attn import cli
from efficient_attn.sweep import runner
ready = Path(sys.argv[1])
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < int(sys.argv[2]):
    time.sleep(0.01)
fake = (sys.executable, "-c", os.environ["FAKE_WORKER"])
runner.run_sweep = functools.partial(runner.run_sweep, command=fake)
sys.exit(cli.main(sys.argv[3:]))
"""

_PRESET = """
description = "work sharing"
methods = ["dense", "xla", "blockwise"]
seq_lens = [16, 32, 64, 128]
passes = ["fwd"]
batch = 1
heads = 2
head_dim = 8
timeout_s = 60
"""


def test_a_shard_lists_every_point_for_status(tmp_path):
    preset = tmp_path / "share.toml"
    preset.write_text(_PRESET)
    name, data = spec.load_preset(str(preset))
    sweep = spec.build_sweep(name, data, {"seq_lens": [16, 32]}, ea.methods())
    env = {"FAKE_LOG": str(tmp_path / "log.tsv"), "FAKE_SLEEP": "0"}
    command = ("env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-c", _FAKE_WORKER)
    outcome = runner.run_sweep(sweep, tmp_path / "out", shard=(1, 2), stream=None, command=command)
    assert outcome.ran == 3 and outcome.path.name == "results.shard-1-of-2.jsonl"
    s = status.status(tmp_path / "out")
    assert (len(s.points), len(s.done), len(s.left)) == (6, 3, 3)


def test_three_processes_share_a_directory_one_killed_mid_point(tmp_path, monkeypatch, capsys):
    """Three sweeps on one --out, one SIGKILLed while a point runs; then a re-run: every
    point is recorded exactly once, and only the killed point ran twice."""
    preset, out, log = tmp_path / "share.toml", tmp_path / "out", tmp_path / "log.tsv"
    preset.write_text(_PRESET)
    env = {**os.environ, "FAKE_WORKER": _FAKE_WORKER, "FAKE_LOG": str(log), "FAKE_SLEEP": "0.4"}
    args = ["sweep", str(preset), "--out", str(out), "--no-report"]

    def start(ready: Path, count: int) -> subprocess.Popen:
        ready.mkdir(exist_ok=True)
        command = [sys.executable, "-c", _DRIVER, str(ready), str(count), *args]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip

    procs = [start(tmp_path / "ready", 3) for _ in range(3)]
    victim = procs[0]
    try:
        deadline, killed = time.time() + 120, None
        while killed is None and time.time() < deadline and victim.poll() is None:
            mine = [ln.split("\t")[0] for ln in _log_lines(log) if ln.endswith(f"\t{victim.pid}")]
            if mine:
                victim.send_signal(signal.SIGKILL)
                killed = mine[-1]
            time.sleep(0.01)
        assert killed is not None, "the victim never started a point"
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert victim.returncode == -signal.SIGKILL
    assert [p.returncode for p in procs[1:]] == [0, 0], outputs
    for name in ("FAKE_LOG", "FAKE_SLEEP"):  # the re-run: in this process, same fake worker
        monkeypatch.setenv(name, env[name])
    fake = (sys.executable, "-c", _FAKE_WORKER)
    monkeypatch.setattr(runner, "run_sweep", functools.partial(runner.run_sweep, command=fake))
    assert cli.main(args) == 0
    rerun_err = capsys.readouterr().err
    keys = [r["key"] for f in results.results_files(out) for r in results.read_rows(f)]
    assert len(keys) == 12 and len(set(keys)) == 12, Counter(keys)
    runs = Counter(ln.split("\t")[0] for ln in _log_lines(log))
    assert runs[killed] == 2 and all(n == 1 for k, n in runs.items() if k != killed), runs
    assert "took over" in "".join(err for _, err in outputs[1:]) + rerun_err
    assert not list(claims.claims_dir(out).glob("*.json"))
    meta = json.loads((out / "sweep.json").read_text())
    assert sorted(p["key"] for p in meta["point_list"]) == sorted(set(keys))


def _log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []
