"""Multi-process start-up: ``jax.distributed`` from arguments or the cluster environment.

Precedence: explicit arguments, then ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, then JAX's own cluster detection
(Slurm: ``SLURM_JOB_ID``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ... under
``srun``; also Open MPI, Kubernetes, Cloud TPU). On CPU, cross-process
collectives need an implementation: gloo (over TCP) is selected before the
backend starts. Call :func:`initialize` before any other JAX call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def cluster_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str | int | None]:
    """``coordinator_address``, ``num_processes``, ``process_id`` from the ``JAX_*`` variables.

    Missing values are None (JAX then detects them from Slurm and friends).
    """
    environ = os.environ if environ is None else environ
    return {
        "coordinator_address": environ.get(ENV_COORDINATOR) or None,
        "num_processes": _env_int(environ, ENV_NUM_PROCESSES),
        "process_id": _env_int(environ, ENV_PROCESS_ID),
    }


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    num_cpu_devices: int | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> tuple[int, int]:
    """Start ``jax.distributed`` and return ``(process_index, process_count)``.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: accelerators this process uses (default: all visible).
      num_cpu_devices: split this host's CPU into that many devices (tests,
        CPU-only clusters); must be set before the backend starts.
      cpu_collectives: cross-process collectives on CPU (``"gloo"`` or
        ``"mpi"``); None leaves JAX's setting alone.
      initialization_timeout: seconds to wait for all processes to connect.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    env = cluster_from_env()
    coordinator_address = coordinator_address or env["coordinator_address"]
    num_processes = env["num_processes"] if num_processes is None else num_processes
    process_id = env["process_id"] if process_id is None else process_id
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if num_cpu_devices is not None:
        if not isinstance(num_cpu_devices, int) or num_cpu_devices < 1:
            raise ValueError(f"{num_cpu_devices=} must be a positive int")
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
        )
    except ValueError as e:
        raise ValueError(
            f"{e} Pass coordinator_address/num_processes/process_id, set {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or run under a cluster manager JAX "
            "detects (e.g. Slurm's srun)."
        ) from e
    return jax.process_index(), jax.process_count()
