"""What the sweep's parent process and its worker processes share.

A row's fields (:func:`base_row`: the point's identity, ``status``,
``message``, every :data:`MEASUREMENTS` field, ``worker_s``, ``skipped``,
``env``), the provenance recorded with it (:func:`environment`: versions,
device, git commit, date), the environment a worker starts with
(:func:`device_env`: host devices for a sequence-parallel point) and how a
failure is classified as out of memory (:func:`looks_like_oom`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

#: Measurement fields of a row; all None unless the point ran.
MEASUREMENTS: tuple[str, ...] = (
    "resolved_options",
    "time_ms",
    "time_ms_min",
    "time_ms_max",
    "time_ms_std",
    "times_ms",
    "compile_s",
    "flops",
    "flops_per_s",
    "memory_bytes",
    "memory_temp_bytes",
    "memory_argument_bytes",
    "memory_output_bytes",
    "compiled_peak_bytes",
    "peak_bytes",
    "host_peak_rss_bytes",
    "host_rss_increase_bytes",
    "block_density",
    "block_mask_build_ms",
    "useful_flops_fwd",
    "executed_flops_fwd",
    "rel_error",
    "grad_rel_error",
    "grad_rel_errors",
    "rel_error_note",
    "time_note",
)
_OOM_PATTERN = re.compile(
    r"resource.?exhausted|out of memory|memoryerror|bad_alloc|cannot allocate memory|\boom\b",
    re.IGNORECASE,
)


def looks_like_oom(text: str) -> bool:
    """Whether an error message or a crashed worker's stderr reports exhausted memory."""
    return _OOM_PATTERN.search(text) is not None


#: The XLA flag that splits the host into several devices (read when JAX starts).
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def device_env(devices: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker for a point on ``devices`` devices.

    On CPU, XLA splits the host into ``devices`` devices (read when JAX starts).
    """
    env = dict(os.environ if environ is None else environ)
    if devices > 1:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={devices}"])
        env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Commit of the source tree this package runs from (``+dirty`` with local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def environment(devices: bool = True) -> dict[str, Any]:
    """Versions, device, git commit and date; ``devices=False`` avoids starting a backend."""
    env: dict[str, Any] = {
        "jax": _package_version("jax"),
        "jaxlib": _package_version("jaxlib"),
        "flax": _package_version("flax"),
        "numpy": _package_version("numpy"),
        "python": platform.python_version(),
        "platform": None,
        "device_kind": None,
        "device_count": None,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "date": utc_now(),
    }
    if devices:
        import jax

        d = jax.devices()[0]
        env.update(platform=d.platform, device_kind=d.device_kind, device_count=jax.device_count())
    return env


def base_row(point: dict[str, Any], status: str, message: str = "") -> dict[str, Any]:
    """A row for ``point`` with every measurement field present (None)."""
    identity = {k: point.get(k) for k in IDENTITY}
    return {
        **identity,
        "repeats": point.get("repeats"),
        "status": status,
        "message": message,
        **dict.fromkeys(MEASUREMENTS),
        "worker_s": None,
        "skipped": False,
        "env": None,
    }


#: The fields of a row that identify its point (:meth:`Point.identity` writes them).
IDENTITY: tuple[str, ...] = (
    "key",
    "method",
    "options",
    "seq_len",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "dtype",
    "causal",
    "pass",
    "seed",
    "devices",
    "strategy",
    "mods",
)
