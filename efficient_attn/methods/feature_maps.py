"""Feature maps ``phi`` of the linear-attention methods (see :mod:`efficient_attn.methods.linear`).

``elu + 1`` (Katharopoulos et al. 2020), ``relu``, the query/key softmaxes of
Shen et al. 2018, and FAVOR+'s positive orthogonal random features
(Choromanski et al. 2020) with their fixed projection.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import masking
from efficient_attn.core.registry import positive_int

_EXP_CAP = 80.0  # exp(80) * 4096 features < float32 max


def _normals(seed: int, stream: int, count: int, draw: int = 4096) -> np.ndarray:
    """``count`` standard normals of ``PRNGKey(seed)``'s stream ``stream``, ``draw`` at a time.

    Fixed-size draws share one compiled kernel whatever the count; evaluated
    eagerly even under ``jit``.
    """
    with jax.ensure_compile_time_eval():
        key = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
        parts = [
            np.asarray(jax.random.normal(jax.random.fold_in(key, i), (draw,), jnp.float32))
            for i in range(masking.cdiv(count, draw))
        ]
    return np.concatenate(parts)[:count].astype(np.float64)


@functools.lru_cache(maxsize=64)
def performer_projection(num_features: int, head_dim: int, seed: int) -> np.ndarray:
    """FAVOR+ random projection ``W [F, H]`` drawn from ``jax.random.PRNGKey(seed)``.

    Rows come in blocks of ``H`` mutually orthogonal directions (QR of a
    Gaussian block), each row rescaled by the norm of an independent Gaussian
    vector, so every row is marginally ``N(0, I_H)`` (Choromanski et al. 2020,
    sec. 2.4). The same ``(num_features, head_dim, seed)`` always gives the
    same array; it never depends on the data.
    """
    blocks = masking.cdiv(num_features, head_dim)
    gauss = _normals(seed, 0, blocks * head_dim * head_dim).reshape(blocks, head_dim, head_dim)
    norms = _normals(seed, 1, num_features * head_dim).reshape(num_features, head_dim)
    q, r = np.linalg.qr(gauss)  # [blocks, H, H]
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = np.swapaxes(q, -1, -2).reshape(blocks * head_dim, head_dim)[:num_features]
    w = (rows * np.linalg.norm(norms, axis=-1)[:, None]).astype(np.float32)
    w.setflags(write=False)
    return w


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureMap:
    """``phi`` for queries and keys of one method.

    ``query(x)`` gives non-negative features ``[..., F]`` (any per-row
    positive factor cancels). ``key(y)`` gives features ``[..., F]`` for
    elu/relu and log-features for the exponential maps (``exp_keys``), which
    the caller exponentiates after subtracting a running maximum.

    Performer queries are shifted per row by ``max_f (log phi(x)_f + log D_f)``
    with ``D`` the row's visible key mass per feature, so the row's normaliser
    ``phi(x)·D`` lies in ``[1, F]``: neither it nor its gradient under- or
    overflows however large the logits. Exponents are capped at ``_EXP_CAP``
    (only reached where float32 would overflow anyway).
    """

    kind: str
    eps: float = 0.0
    projection: jax.Array | np.ndarray | None = None  # [F, H], performer

    @property
    def exp_keys(self) -> bool:
        return self.kind in ("linear_softmax", "performer")

    @property
    def per_feature(self) -> bool:
        """Normalised per feature (``linear_softmax``) instead of per row."""
        return self.kind == "linear_softmax"

    def num_features(self, head_dim: int) -> int:
        return head_dim if self.projection is None else self.projection.shape[0]

    def _favor_logits(self, x: jax.Array) -> jax.Array:
        w = jnp.asarray(self.projection, x.dtype)
        return x @ w.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)

    def query(self, x: jax.Array, mass: jax.Array) -> jax.Array:
        """Features ``[..., F]`` of ``x [..., H]``; ``mass`` (broadcasts to ``[..., F]``):
        the visible keys' feature sums, which only set performer's per-row shift."""
        if self.kind == "linear_elu":
            return jax.nn.elu(x) + 1.0
        if self.kind == "linear_relu":
            return jax.nn.relu(x)
        if self.kind == "linear_softmax":
            return jax.nn.softmax(x, axis=-1)
        logits = self._favor_logits(x)
        plain = jax.lax.stop_gradient(logits)
        shift = jnp.max(plain + jnp.log(jax.lax.stop_gradient(mass)), axis=-1, keepdims=True)
        shift = jnp.where(jnp.isfinite(shift), shift, jnp.max(plain, axis=-1, keepdims=True))
        return jnp.exp(jnp.minimum(logits - shift, _EXP_CAP))

    def key(self, y: jax.Array) -> jax.Array:
        if self.kind == "linear_elu":
            return jax.nn.elu(y) + 1.0
        if self.kind == "linear_relu":
            return jax.nn.relu(y)
        if self.kind == "linear_softmax":
            return y
        return self._favor_logits(y)


def feature_map(method: str, head_dim: int, options: dict[str, Any]) -> tuple[FeatureMap, int]:
    """(feature map, chunk) of ``method`` after validating option values."""
    chunk = positive_int("chunk", options["chunk"])
    if method == "linear_relu":
        eps = options["eps"]
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < np.inf:
            raise ValueError(f"eps={eps!r} must be a positive finite float")
        return FeatureMap(method, eps=float(eps)), chunk
    if method == "performer":
        num_features = positive_int("num_features", options["num_features"])
        seed = options["seed"]
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        projection = performer_projection(num_features, head_dim, int(seed))
        return FeatureMap(method, projection=projection), chunk
    return FeatureMap(method), chunk
