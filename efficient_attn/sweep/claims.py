"""Claims: several processes share one results directory without running a point twice.

A process claims a point before it runs it: ``DIR/.claims/<digest of key>.json``
holds the point's key and label, the claimant's host, pid and machine identity,
a token, its start time and after how long without a heartbeat it counts as
dead (``stale_after_s``). The claim file's mtime is the heartbeat: a background
thread of the claimant touches it every :data:`HEARTBEAT_S` seconds.

A claim is dead when its process is gone (same machine: the pid no longer
exists, is a zombie, or now belongs to a process started at another time) or
its heartbeat is older than ``stale_after_s`` (the point's timeout plus
:data:`STALE_MARGIN_S`; the only test across hosts, whose clocks may differ by
up to the margin). A dead claim is taken over; a live one is left alone.

Why one file per point plus a short lock (and not one claims file): creating,
taking over and releasing a claim happen under an exclusive ``fcntl`` lock on
``DIR/.claims/.lock``, held for milliseconds, so a takeover is a
compare-and-swap that no other process can interleave with (files alone have
no such operation), and the kernel drops the lock of a process that dies,
SIGKILL included. Heartbeats need no lock: each process touches only its own
files, so a long sweep never contends, and ``--status`` is a directory listing.
The claim itself is created with ``O_CREAT | O_EXCL`` (one owner even if the
lock were not honoured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLAIMS = ".claims"
#: Seconds between heartbeats of a running claim.
HEARTBEAT_S = 5.0
#: Seconds added to a point's timeout before a silent claim counts as dead.
STALE_MARGIN_S = 120.0


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to detect reused pids."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5); 0: state


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _machine() -> str:
    """Host, boot and pid namespace: where a pid names the same process as here."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "|".join(parts)


MACHINE = _machine()
HOST = socket.gethostname()


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` is a running process on this machine (started at ``started``, if given)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    if _zombie(pid):
        return False
    now = _proc_start(pid)
    return started is None or now is None or now == started


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim file as read: who runs which point since when, and its last heartbeat."""

    path: Path
    key: str
    label: str
    host: str
    machine: str
    pid: int
    pid_started: str | None
    token: str
    started: float
    stale_after_s: float
    heartbeat: float

    def dead(self, now: float | None = None) -> str | None:
        """Why the claimant is dead (its claim may be taken over), or None if it is alive."""
        if self.machine == MACHINE and not pid_alive(self.pid, self.pid_started):
            return f"process {self.pid} on {self.host} is gone"
        age = (time.time() if now is None else now) - self.heartbeat
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_after_s:g} s)"
        return None


def claims_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CLAIMS


def claim_path(out_dir: str | Path, key: str) -> Path:
    return claims_dir(out_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def read_claim(path: Path) -> Claim | None:
    """The claim at ``path``; None if it is absent or unreadable."""
    try:
        data = json.loads(path.read_text())
        heartbeat = path.stat().st_mtime
        return Claim(
            path=path,
            key=str(data["key"]),
            label=str(data.get("label", data["key"])),
            host=str(data["host"]),
            machine=str(data["machine"]),
            pid=int(data["pid"]),
            pid_started=data.get("pid_started"),
            token=str(data["token"]),
            started=float(data["started"]),
            stale_after_s=float(data["stale_after_s"]),
            heartbeat=heartbeat,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def locked(out_dir: str | Path) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``DIR/.claims/.lock`` (released by the kernel on death)."""
    directory = claims_dir(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def list_claims(out_dir: str | Path) -> list[Claim]:
    """Every readable claim in ``out_dir``, oldest first (read under the lock)."""
    if not claims_dir(out_dir).is_dir():
        return []
    with locked(out_dir):
        found = [read_claim(p) for p in claims_dir(out_dir).glob("*.json")]
    return sorted((c for c in found if c is not None), key=lambda c: c.started)


def live_claims(out_dir: str | Path) -> list[Claim]:
    """The claims whose process is alive."""
    return [c for c in list_claims(out_dir) if c.dead() is None]


def remove_dead(out_dir: str | Path, keys: set[str]) -> int:
    """Remove the dead claims on ``keys`` (points already recorded); how many."""
    if not claims_dir(out_dir).is_dir():
        return 0
    removed = 0
    with locked(out_dir):
        for path in claims_dir(out_dir).glob("*.json"):
            claim = read_claim(path)
            if claim is not None and claim.key in keys and claim.dead() is not None:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


@dataclasses.dataclass(frozen=True)
class Acquired:
    """A claim this process now holds; ``took_over`` is the dead claim it replaced."""

    key: str
    path: Path
    token: str
    took_over: Claim | None = None
    reason: str | None = None


class Claims:
    """This process's claims on one results directory, kept alive by a heartbeat thread.

    Use as a context manager: on exit every claim still held is removed.
    """

    def __init__(
        self, out_dir: str | Path, stale_after_s: float, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        if not stale_after_s > 0 or not heartbeat_s > 0:
            raise ValueError(f"{stale_after_s=} and {heartbeat_s=} must be positive seconds")
        self.out_dir, self.stale_after_s, self.heartbeat_s = (
            Path(out_dir),
            stale_after_s,
            heartbeat_s,
        )
        self.held: dict[str, Acquired] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid_started = _proc_start(os.getpid())

    def _record(self, key: str, label: str, token: str) -> bytes:
        record = {
            "key": key,
            "label": label,
            "host": HOST,
            "machine": MACHINE,
            "pid": os.getpid(),
            "pid_started": self._pid_started,
            "token": token,
            "started": time.time(),
            "stale_after_s": self.stale_after_s,
        }
        return (json.dumps(record) + "\n").encode()

    def acquire(self, key: str, label: str = "") -> Acquired | None:
        """Claim ``key``; None if a live process holds it (a dead claim is taken over)."""
        path, token = claim_path(self.out_dir, key), uuid.uuid4().hex
        data = self._record(key, label or key, token)
        with locked(self.out_dir):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                old = read_claim(path)  # unreadable under the lock: its writer died mid-write
                reason = "unreadable claim" if old is None else old.dead()
                if reason is None:
                    return None
                tmp = path.with_name(f".{token}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                got = Acquired(key, path, token, old, reason)
            else:
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                got = Acquired(key, path, token)
        with self._mutex:
            self.held[key] = got
        self._start_heartbeat()
        return got

    def release(self, key: str) -> None:
        """Remove this process's claim on ``key`` (never another process's takeover of it)."""
        with self._mutex:
            got = self.held.pop(key, None)
        if got is None:
            return
        with locked(self.out_dir):
            current = read_claim(got.path)
            if current is not None and current.token == got.token:
                got.path.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.touch()

    def touch(self) -> None:
        """Refresh the heartbeat of every claim still ours."""
        with self._mutex:
            held = list(self.held.values())
        for got in held:
            current = read_claim(got.path)
            if current is not None and current.token == got.token:
                with contextlib.suppress(OSError):
                    os.utime(got.path)

    def close(self) -> None:
        """Stop the heartbeat and remove every claim still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for key in list(self.held):
            self.release(key)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
