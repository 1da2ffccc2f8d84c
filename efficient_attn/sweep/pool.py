"""Worker processes that measure consecutive points, one point at a time.

A fresh Python process per point spends most of its life importing JAX (about
2 s on a 2-core CPU, more than most points take to compile and time); a worker
that serves consecutive points pays that once. :class:`WorkerPool` keeps at
most one worker alive: it sends each point as one JSON line on the worker's
stdin and reads its row back as one JSON line on stdout (other stdout lines are
ignored), starting a new worker when the device count changes, when a worker
died, or when a worker chose to exit after its point. A point
that times out kills its worker's process group; a worker that crashes, is
killed or exits without a row still becomes a row for the point in flight, and
the next point gets a new worker. The worker resets the process's peak
resident memory before each point and exits after a point on a device that
reports its own peak (``memory_stats``), so no row's memory includes another
point's (see :mod:`efficient_attn.sweep.worker`).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from efficient_attn.sweep.protocol import base_row, device_env, looks_like_oom

#: ``python -m efficient_attn.sweep.worker --serve``: the worker that reads points line by line.
WORKER = (sys.executable, "-m", "efficient_attn.sweep.worker", "--serve")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def parse_row(line: str) -> dict[str, Any] | None:
    """The row on one stdout line of a worker, or None for any other output."""
    if not line.startswith("{"):
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "status" in row else None


def group_of(payload: dict[str, Any]) -> int:
    """Points of one group may share a worker process: those on the same device count (a
    process's device count is fixed when JAX starts)."""
    return int(payload.get("devices") or 1)


class WorkerPool:
    """At most one live worker process, reused for consecutive points on one device count.

    ``execute(payload)`` returns the point's row (never raises for a failing
    point); ``close()`` ends the live worker. Use it as a context manager.
    ``one_shot``: a new process per point, its stdin closed after the point
    (the protocol of ``python -m efficient_attn.sweep.worker < point.json``).
    """

    def __init__(self, timeout_s: float, command: Sequence[str] = WORKER, one_shot: bool = False):
        self.timeout_s = float(timeout_s)
        self.command = list(command)
        self.one_shot = one_shot  # a worker that reads all of stdin, measures one point, exits
        self.proc: subprocess.Popen | None = None
        self.group: int | None = None
        self._stderr: Any = None
        self._buffer = b""

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self, group: int) -> None:
        self.close()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed by close())
        self.proc = subprocess.Popen(
            self.command,
            env=device_env(group),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,  # Ctrl-C reaches the runner, which then stops the worker
        )
        self.group, self._buffer = group, b""

    def close(self) -> None:
        """End the live worker: EOF on its stdin, then a kill if it lingers."""
        proc, self.proc, self.group = self.proc, None, None
        if proc is not None:
            try:
                if not proc.stdin.closed:
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._kill(proc)
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _stderr_tail(self, since: int) -> str:
        self._stderr.seek(since)
        return self._stderr.read().decode(errors="replace").strip()[-1500:]

    def _read_row(self, deadline: float) -> dict[str, Any] | str:
        """The next row, or ``"timeout"`` / ``"eof"``."""
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    row = parse_row(line.decode(errors="replace").strip())
                    if row is not None:
                        return row
                left = deadline - time.perf_counter()
                if left <= 0:
                    return "timeout"
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    row = parse_row(self._buffer.decode(errors="replace").strip())
                    self._buffer = b""
                    return row if row is not None else "eof"
                self._buffer += chunk

    def execute(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Measure one point in the group's worker; a crash, kill or timeout becomes a row."""
        group = group_of(payload)
        if (
            self.one_shot
            or self.proc is None
            or self.group != group
            or self.proc.poll() is not None
        ):
            self._start(group)
        start = time.perf_counter()
        since = self._stderr.seek(0, os.SEEK_END)
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
            if self.one_shot:
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # it died; _read_row sees EOF and the exit status says how
        try:
            got = self._read_row(start + self.timeout_s)
        except BaseException:
            self._kill(self.proc)
            self.close()
            raise
        if isinstance(got, dict):
            if got.pop("worker_exit", False) or self.one_shot:
                self.close()
            return got
        proc = self.proc
        if got == "timeout":
            self._kill(proc)
            self.close()
            row = base_row(payload, "error", f"timeout: killed after {self.timeout_s:g} s")
            row["worker_s"] = time.perf_counter() - start
            return row
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            rc = proc.returncode
        tail = self._stderr_tail(since)
        self.close()
        if rc < 0 and -rc == signal.SIGKILL:
            status = "oom"
            message = (
                "worker killed by SIGKILL (the kernel's out-of-memory killer is the usual cause)"
            )
        else:
            how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exited with status {rc}"
            status = "oom" if looks_like_oom(tail) else "error"
            message = f"worker {how} without a result"
        row = base_row(payload, status, message + (f"; stderr: {tail}" if tail else ""))
        row["worker_s"] = time.perf_counter() - start
        return row
