"""Shared test helpers: random inputs and the list of registered methods."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

# The suite is dominated by XLA compiling many small programs. Skip LLVM's expensive
# optimisation passes (about 25% less wall time), and emit fusions with XLA's older
# elemental emitters rather than its MLIR fusion emitters (about half the compile time
# again, measured on the engine's forward+backward programs). Results agree to float
# rounding, which the tests' tolerances allow; nothing here times anything (benchmarks
# live in scripts/). Sweep workers started by the tests inherit the flags.
_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
_FUSION_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _fusion_flag_known() -> bool:
    """Whether this jaxlib's XLA knows :data:`_FUSION_FLAG` (an unknown flag aborts XLA):
    asked once of a child process, the answer handed down to xdist workers."""
    known = os.environ.get("EFFICIENT_ATTN_TEST_FUSION_FLAG")
    if known is None:
        probe = "import jax; jax.devices()"
        env = {**os.environ, "XLA_FLAGS": _FUSION_FLAG, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
        known = os.environ["EFFICIENT_ATTN_TEST_FUSION_FLAG"] = str(int(done.returncode == 0))
    return known == "1"


if _FUSION_FLAG not in os.environ.get("XLA_FLAGS", "") and _fusion_flag_known():
    _FLAGS.append(_FUSION_FLAG)
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        *(f for f in _FLAGS if f not in os.environ.get("XLA_FLAGS", "")),
    ]
).strip()

# "auto" traces the XLA engine alone on this CPU; the tests that lower for CUDA or TPU
# ask for every branch (tests/test_pallas.py's _lower).
os.environ.setdefault("EFFICIENT_ATTN_KERNEL_BRANCHES", "present")

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import efficient_attn as ea
from efficient_attn import bench

# JAX's persistent compilation cache: two thirds of the suite's time is XLA compiling, and a
# re-run after a small change recompiles only what the change touched. Shared by the xdist
# workers and the sweep/study worker processes the tests start (they inherit the variables).
# EFFICIENT_ATTN_TEST_CACHE=off turns it off; a path moves it. One folder per xdist worker:
# a worker reading an entry that the other is still writing saw a truncated file ("zlib.error:
# Error -5 while decompressing data").
_CACHE = os.environ.setdefault(
    "EFFICIENT_ATTN_TEST_CACHE", str(pathlib.Path(__file__).parent.parent / ".cache" / "jax-tests")
)
if _CACHE != "off":
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(pathlib.Path(_CACHE) / _worker)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")


def make_qkv(
    batch=2, q_len=13, kv_len=13, heads=4, kv_heads=2, head_dim=16, value_dim=None, seed=0
):
    """Random normal float32 numpy q [B,Tq,N,H], k [B,Tk,K,H], v [B,Tk,K,Hv]."""
    rng = np.random.default_rng(seed)
    value_dim = head_dim if value_dim is None else value_dim
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, value_dim)).astype(np.float32)
    return q, k, v


def method_arrays(method: str, head_dim: int, seed: int = 0, **dims: int) -> dict[str, np.ndarray]:
    """The array options ``method`` requires (``ea.init_arrays``) as float32 NumPy; {} if none.

    ``dims``: ``B``, ``T``, ``K`` of the call, for per-token arrays (``log_decay``, ``beta``).
    Concrete also when called inside jitted test functions (see ``bench.with_arrays``).
    """
    made = bench.with_arrays(method, head_dim, {}, seed=seed + 7, **dims)
    return {name: np.asarray(x, np.float32) for name, x in made.items()}


def rel_err(x, ref) -> float:
    """Relative Frobenius error, with an absolute floor of 1e-6 RMS for near-zero references."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    floor = 1e-6 * np.sqrt(max(ref.size, 1))
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))


def method_params(fast: tuple[str, ...] | None = None):
    """One pytest param per registered method; unavailable ones are marked to skip.

    With ``fast``, methods not listed are marked ``slow`` (deselected by default;
    ``pytest -m slow`` runs them): for expensive end-to-end tests where one
    method per family is enough on every run.
    """
    params = []
    for name in ea.methods():
        reason = ea.get_method(name).available()
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if fast is not None and name not in fast:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(name, id=name, marks=marks))
    return params
