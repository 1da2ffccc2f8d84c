"""Shared mechanics written once: masks, GQA grouping, padding to tiles, softmax.

Conventions (see ``efficient_attn.core.api``):
  * causal is bottom-right aligned: query ``i`` sees key ``j`` iff
    ``j <= i + (Tk - Tq)``;
  * ``kv_lengths[b]``: keys at positions ``>= kv_lengths[b]`` are padding;
  * query head ``n`` uses key/value head ``n // G`` with ``G = N // K``
    (the convention of ``jax.nn.dot_product_attention``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


def stat_dtype(dtype) -> jnp.dtype:
    """dtype of softmax statistics: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def full_kv_lengths(kv_lengths: jax.Array | None, batch: int, tk: int) -> jax.Array:
    """``kv_lengths`` as int32 ``[B]``; None means every key is valid."""
    if kv_lengths is None:
        return jnp.full((batch,), tk, jnp.int32)
    return jnp.asarray(kv_lengths, jnp.int32)


def visible(
    q_pos: jax.Array,
    k_pos: jax.Array,
    kv_len: jax.Array,
    *,
    causal: bool,
    offset: int,
) -> jax.Array:
    """Which (query, key) pairs interact; broadcasts its arguments.

    Args:
      q_pos: query positions, e.g. ``[..., Tq, 1]``.
      k_pos: key positions, e.g. ``[..., 1, Tk]``.
      kv_len: valid key count, broadcastable against ``k_pos``.
      causal: apply the bottom-right causal rule.
      offset: ``Tk - Tq`` of the full (unpadded) problem.
    """
    mask = k_pos < kv_len
    if causal:
        mask = mask & (k_pos <= q_pos + offset)
    return mask


def dense_mask(
    kv_lengths: jax.Array | None, batch: int, tq: int, tk: int, *, causal: bool
) -> jax.Array:
    """Boolean ``[B, Tq, Tk]`` mask of visible pairs."""
    kv_len = full_kv_lengths(kv_lengths, batch, tk)
    return visible(
        jnp.arange(tq)[None, :, None],
        jnp.arange(tk)[None, None, :],
        kv_len[:, None, None],
        causal=causal,
        offset=tk - tq,
    )


def nonempty_rows(
    kv_lengths: jax.Array | None, batch: int, tq: int, tk: int, *, causal: bool
) -> jax.Array:
    """Boolean ``[B, Tq]``: which query rows see at least one key (O(B*Tq) work)."""
    kv_len = full_kv_lengths(kv_lengths, batch, tk)
    rows = jnp.broadcast_to(kv_len[:, None] > 0, (batch, tq))
    if causal:
        last_key = jnp.arange(tq) + (tk - tq)  # last visible key of each row
        rows = rows & (last_key >= 0)[None, :]
    return rows


def mod_indices(batch: int, kv_heads: int, groups: int, tq: int, tk: int):
    """Index arrays of grouped scores ``[B, K, G, Tq, Tk]`` for mods: (b, h, q_idx, kv_idx).

    ``h`` is the query head ``k * G + g``; each array is int32 and broadcastable.
    """
    b = jnp.arange(batch, dtype=jnp.int32).reshape(batch, 1, 1, 1, 1)
    h = jnp.arange(kv_heads, dtype=jnp.int32)[:, None] * groups + jnp.arange(
        groups, dtype=jnp.int32
    )
    q = jnp.arange(tq, dtype=jnp.int32).reshape(1, 1, 1, tq, 1)
    kv = jnp.arange(tk, dtype=jnp.int32).reshape(1, 1, 1, 1, tk)
    return b, h.reshape(1, kv_heads, groups, 1, 1), q, kv


def apply_mods(logits: jax.Array, mask: jax.Array, mask_mod=None, score_mod=None):
    """Materialised mods on grouped scaled logits ``[B, K, G, Tq, Tk]`` and their ``mask``.

    ``score_mod`` maps the logits, ``mask_mod`` is ANDed into the mask
    (FlexAttention's semantics, evaluated on the whole matrix: the reference
    the tile engine is checked against).
    """
    b, kh, g, tq, tk = logits.shape
    idx = mod_indices(b, kh, g, tq, tk)
    if score_mod is not None:
        out = score_mod(logits, *idx)
        if out.shape != logits.shape or out.dtype != logits.dtype:
            raise ValueError(
                f"score_mod must return an array of score's shape and dtype {logits.shape} "
                f"{logits.dtype}; it returned {out.shape} {out.dtype}"
            )
        logits = out
    if mask_mod is not None:
        m = mask_mod(*idx)
        if getattr(m, "dtype", None) != jnp.bool_:
            raise ValueError(
                f"mask_mod must return a boolean array (e.g. kv_idx <= q_idx); it returned "
                f"{getattr(m, 'dtype', type(m))}"
            )
        mask = mask & m
    return logits, mask


@jax.custom_jvp
def safe_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give 0.

    Stable for large logits (the row max is subtracted) and NaN-free for empty
    rows and their gradients. Its derivative is softmax's own,
    ``dp = p * (dl - sum(p * dl))`` (as ``jax.nn.softmax``'s), not autodiff through
    the exp, sum and division (``dense``'s MQAR T256 training step: 134.5 -> 83.9 ms,
    ``scripts/bench_train.py --methods-only``).
    """
    s = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom == 0, 1.0, denom)


@safe_softmax.defjvp
def _safe_softmax_jvp(primals, tangents):
    logits, mask = primals
    p = safe_softmax(logits, mask)
    dl = jnp.where(mask, tangents[0], 0)  # masked entries have p = 0: no NaN from their tangents
    return p, p * (dl - jnp.sum(p * dl, axis=-1, keepdims=True))


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[B, T, N, H] -> [B, T, K, G, H]``: query heads grouped by their K/V head."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h)


def ungroup_heads(x: jax.Array) -> jax.Array:
    """``[B, T, K, G, H] -> [B, T, N, H]`` (inverse of :func:`group_queries`)."""
    b, t, k, g, h = x.shape
    return x.reshape(b, t, k * g, h)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad ``axis`` of ``x`` up to a multiple of ``multiple``."""
    size = x.shape[axis]
    extra = cdiv(size, multiple) * multiple - size
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["seed"], meta_fields=["rate", "broadcast"]
)
@dataclasses.dataclass(frozen=True)
class Dropout:
    """Inverted dropout on attention weights (Srivastava et al. 2014), counter-based.

    Whether weight ``(b, h, q, kv)`` is kept is a hash of ``seed`` and those
    four indices (:func:`dropout_keep`), so the mask is the same for every
    method and tile size, and a backward regenerates the forward's mask tile
    by tile (nothing ``[N, Tq, Tk]`` is stored). ``seed``: uint32 ``[2]``;
    ``broadcast``: one mask shared by all batch rows and heads (Flax's
    ``broadcast_dropout``).
    """

    rate: float
    seed: jax.Array
    broadcast: bool = False

    def keep(self, b, h, q_idx, kv_idx) -> jax.Array:
        """Bool, broadcast of the int index arrays: which weights survive."""
        if self.broadcast:
            b, h = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
        return dropout_keep(self.seed, b, h, q_idx, kv_idx, self.rate)

    def apply(self, p: jax.Array, b, h, q_idx, kv_idx) -> jax.Array:
        """``p`` with dropped weights zeroed and the kept ones scaled by ``1 / (1 - rate)``."""
        return self.scale(p, self.keep(b, h, q_idx, kv_idx))

    def scale(self, p: jax.Array, keep: jax.Array) -> jax.Array:
        """:meth:`apply` with the ``keep`` mask already drawn (reused for several arrays)."""
        return jnp.where(keep, p * (1.0 / (1.0 - self.rate)), jnp.zeros((), p.dtype))


def dropout(rate: float, rng: jax.Array, *, broadcast: bool = False) -> Dropout | None:
    """A :class:`Dropout` of ``rate`` in [0, 1) drawn from the PRNG key ``rng`` (None for 0)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate={rate!r} must be a float in [0, 1)")
    if rate == 0.0:
        return None
    if rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
    try:
        seed = jax.random.bits(rng, (2,), jnp.uint32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"dropout_rng must be a jax.random key; got {rng!r} ({e})") from e
    return Dropout(float(rate), seed, bool(broadcast))


def dropout_keep(seed: jax.Array, b, h, q_idx, kv_idx, rate: float) -> jax.Array:
    """Counter-based keep mask: hash of ``(seed, b, h, q_idx, kv_idx)`` >= ``rate * 2^32``.

    ``seed``: uint32 ``[2]``, or a pair of scalars (the fused kernels read them one at a time).

    The index arrays broadcast; the per-row part of the hash is computed on
    the broadcast of ``b, h, q_idx`` only, so a ``[.., bq, bk]`` tile costs
    two finaliser rounds per element.
    """
    u = lambda x: jnp.asarray(x).astype(jnp.uint32)  # noqa: E731
    seed0, seed1 = u(seed[0]), u(seed[1])  # a uint32 [2] array or two scalars (in a kernel)
    x = _fmix32(seed0 + u(b) * jnp.uint32(0x9E3779B9))
    x = _fmix32(x ^ (u(h) * jnp.uint32(0x85EBCA77) + seed1))
    x = _fmix32(x ^ (u(q_idx) * jnp.uint32(0xC2B2AE3D)))
    x = _fmix32(_fmix32(x ^ (u(kv_idx) * jnp.uint32(0x27D4EB2F))))
    threshold = min(round(rate * 2.0**32), 2**32 - 1)
    return x >= jnp.uint32(threshold)


def check_bias(bias, batch: int, heads: int, tq: int, tk: int, dtype=None) -> jax.Array:
    """``bias`` as a floating ``[B|1, N|1, Tq|1, Tk|1]`` array (lower ranks are right-aligned).

    A bias broadcastable to ``[B, N, Tq, Tk]`` (``jax.nn.dot_product_attention``'s
    rule) is reshaped to rank 4; anything else raises ``ValueError``.
    """
    bias = jnp.asarray(bias)
    full = (batch, heads, tq, tk)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise ValueError(f"bias must be a floating-point array; got dtype {bias.dtype}")
    if bias.ndim > 4:
        raise ValueError(f"bias must have rank <= 4 (broadcastable to [B, N, T, S]={full}); "
                         f"got shape {bias.shape}")  # fmt: skip
    shape = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    if any(s not in (1, f) for s, f in zip(shape, full, strict=True)):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not broadcast to [B, N, T, S]={full}"
        )
    return bias.reshape(shape)
