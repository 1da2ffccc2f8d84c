"""Multi-process start-up (see :mod:`efficient_attn.parallel.distributed`)."""

from efficient_attn.parallel.distributed import cluster_from_env, initialize

__all__ = ["cluster_from_env", "initialize"]
