"""The functional API: validation written once, dispatch through the registry."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import eager, masking
from efficient_attn.core.batching import Batch
from efficient_attn.core.blockmask import BlockMask, check_block_mask
from efficient_attn.core.registry import HEAD_DIM, Method, get_method, methods, methods_supporting


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Named dimensions of one call: q [B,Tq,N,H], k [B,Tk,K,H], v [B,Tk,K,Hv]."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int


def _check_rank(name: str, x: Any) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"{name} must have rank 4 [batch, seq, heads, head_dim]; got shape {shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}")


def check_inputs(query: jax.Array, key: jax.Array, value: jax.Array | None) -> Shapes:
    """Validate ``query [B,Tq,N,H]``, ``key [B,Tk,K,H]``, ``value [B,Tk,K,Hv]``."""
    _check_rank("query", query)
    _check_rank("key", key)
    if value is not None:
        _check_rank("value", value)
    b, tq, n, h = query.shape
    bk, tk, kh, hk = key.shape
    if bk != b:
        raise ValueError(f"batch sizes differ: query {b}, key {bk}")
    if hk != h:
        raise ValueError(f"head_dim of query ({h}) and key ({hk}) must be equal")
    if kh < 1 or n % kh != 0:
        raise ValueError(
            f"query heads N={n} must be a multiple of key/value heads K={kh} "
            "(K == N: multi-head, K == 1: multi-query, otherwise grouped-query)"
        )
    if tk < 1 or tq < 1:
        raise ValueError(f"sequence lengths must be >= 1; got Tq={tq}, Tk={tk}")
    hv = h
    if value is not None:
        if value.shape[:3] != key.shape[:3]:
            raise ValueError(
                f"key {key.shape} and value {value.shape} must agree on "
                "[batch, seq, kv_heads] (the key and value lengths must be equal)"
            )
        if value.dtype != query.dtype or key.dtype != query.dtype:
            raise ValueError(
                f"query, key and value must share a dtype; got {query.dtype}, "
                f"{key.dtype}, {value.dtype}"
            )
        hv = value.shape[3]
    elif key.dtype != query.dtype:
        raise ValueError(f"query and key must share a dtype; got {query.dtype}, {key.dtype}")
    return Shapes(b, tq, tk, n, kh, h, hv)


def check_lengths(name: str, lengths: Any, batch: int, length: int, dim: str) -> jax.Array | None:
    """Per-example ``lengths`` as an int32 ``[B]`` array in ``[0, length]`` (checked where
    concrete); ``name`` and the dimension's name ``dim`` are for the error messages."""
    if lengths is None:
        return None
    arr = jnp.asarray(lengths)
    if arr.shape != (batch,) or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array of shape [batch]=({batch},); "
            f"got shape {arr.shape}, dtype {arr.dtype}"
        )
    if not isinstance(arr, jax.core.Tracer):
        values = np.asarray(arr)
        if (values < 0).any() or (values > length).any():
            raise ValueError(f"{name} must lie in [0, {dim}={length}]; got {values.tolist()}")
    return arr.astype(jnp.int32)


def check_kv_lengths(kv_lengths: Any, shapes: Shapes) -> jax.Array | None:
    """``kv_lengths`` as an int32 ``[B]`` array, values checked where concrete."""
    return check_lengths("kv_lengths", kv_lengths, shapes.batch, shapes.kv_len, "Tk")


#: Call arguments that need a feature, and the feature.
_FEATURE_ARGS = {
    "mask_mod": "mask_mod",
    "block_mask": "mask_mod",
    "score_mod": "score_mod",
    "bias": "bias",
    "dropout": "dropout",
    "return_lse": "lse",
}


def _check_mods(spec: Method, mods: dict[str, Any], shapes: Shapes, opts: dict[str, Any]) -> None:
    """Mods only for methods that accept them; callables; a block mask of this call's sizes."""
    for arg, value in mods.items():
        if value is None or value is False:
            continue
        feature = _FEATURE_ARGS[arg]
        if feature not in spec.supports:
            raise ValueError(
                f"method {spec.name!r} does not accept {arg}; methods that do: "
                f"{', '.join(methods_supporting(feature))}"
            )
        if arg in ("mask_mod", "score_mod") and not callable(value):
            raise ValueError(f"{arg} must be a callable; got {value!r}")
    if mods.get("bias") is not None:
        mods["bias"] = masking.check_bias(
            mods["bias"], shapes.batch, shapes.heads, shapes.q_len, shapes.kv_len
        )
    bm = mods.get("block_mask")
    if bm is not None:
        check_block_mask(bm, shapes.q_len, shapes.kv_len, shapes.batch, shapes.heads)
        for name, size in (("block_q", bm.block_q), ("block_k", bm.block_k)):
            given = opts.get(name)
            if given is not None and given != size:
                raise ValueError(
                    f"{name}={given} disagrees with block_mask's {name}={size}; the tiles are the "
                    f"block mask's (omit {name}, or build the block mask with it)"
                )


def _check_features(spec: Method, shapes: Shapes, causal: bool, kv_lengths: Any) -> None:
    needed = []
    if causal:
        needed.append("causal")
    if kv_lengths is not None:
        needed.append("kv_lengths")
    if shapes.q_len != shapes.kv_len:
        needed.append("cross")
    if shapes.kv_heads != shapes.heads:
        needed.append("gqa")
    missing = [f for f in needed if f not in spec.supports]
    if missing:
        raise ValueError(
            f"method {spec.name!r} does not support {missing}; it supports {sorted(spec.supports)}"
        )
    reason = spec.available()
    if reason is not None:
        raise ValueError(f"method {spec.name!r} is not available here: {reason}")
    if spec.causal_only and not causal:
        raise ValueError(
            f"method {spec.name!r} is a causal recurrence over the keys (each position "
            "updates a state the later ones read): it needs causal=True self-attention"
        )


def _check_arrays(spec: Method, opts: dict[str, Any], shapes: Shapes) -> None:
    """Every array option ``spec`` requires is given, with agreeing shapes.

    Optional arrays left out are filled in ``opts`` with their initialiser's value.
    """
    if not spec.arrays:
        return
    missing = [n for n, a in spec.arrays.items() if a.required and opts.get(n) is None]
    if missing:
        wanted = ", ".join(f"{n} [{', '.join(spec.arrays[n].shape)}]" for n in spec.arrays)
        raise ValueError(
            f"method {spec.name!r} requires array option(s) {missing} (it takes {wanted}; "
            "B = batch, T = key length, K = kv_heads, H = head_dim); create them with "
            f"ea.init_arrays({spec.name!r}, key, head_dim, B=..., T=..., K=...) "
            "or learn them (efficient_attn.nn.MultiHeadAttention does)"
        )
    bound: dict[str, tuple[int, str]] = {
        HEAD_DIM: (shapes.head_dim, "query/key head_dim"),
        "B": (shapes.batch, "the batch"),
        "T": (shapes.kv_len, "the key length"),
        "K": (shapes.kv_heads, "the key/value heads"),
    }
    for name, array in spec.arrays.items():
        if opts.get(name) is None:
            shape = tuple(bound[d][0] if d in bound else spec.sizes[d] for d in array.shape)
            with jax.ensure_compile_time_eval():
                opts[name] = array.init(jax.random.PRNGKey(0), shape, jnp.float32)
        x = opts[name]
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != len(array.shape):
            raise ValueError(
                f"{name} of method {spec.name!r} must have shape [{', '.join(array.shape)}]; "
                f"got {shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}")
        for dim, size in zip(array.shape, shape, strict=True):
            expected, where = bound.setdefault(dim, (size, name))
            if size != expected:
                raise ValueError(
                    f"{name} has {dim}={size} but {where} has {dim}={expected} "
                    f"(method {spec.name!r}: {name} is [{', '.join(array.shape)}])"
                )


def prepare(query, key, value, method, causal, kv_lengths, scale, options, mods=None):
    """Validate one call: ``(spec, shapes, kv_lengths, scale, options, mod kwargs)``.

    The mod kwargs are what the method receives: ``mask_mod``/``block_mask``,
    ``score_mod``, ``bias``, ``dropout`` and ``return_lse`` for methods that
    support them (see :data:`efficient_attn.FEATURES`), nothing for the others.
    """
    spec = get_method(method)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool; got {causal!r}")
    shapes = check_inputs(query, key, value)
    kv_lengths = check_kv_lengths(kv_lengths, shapes)
    _check_features(spec, shapes, bool(causal), kv_lengths)
    mods = dict(mods or {})
    _check_mods(spec, mods, shapes, options)
    opts = spec.resolve_options(options)
    _check_arrays(spec, opts, shapes)
    if scale is None:
        scale = spec.default_scale(shapes.head_dim)
    kwargs = {}
    for arg, feature in _FEATURE_ARGS.items():
        if feature in spec.supports:
            kwargs[arg] = mods.get(arg, False if arg == "return_lse" else None)
    return spec, shapes, kv_lengths, scale, opts, kwargs


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    method: str = "dense",
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: BlockMask | None = None,
    bias: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_broadcast: bool = False,
    return_lse: bool = False,
    **options: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of ``query`` over ``key``/``value`` with any registered method.

    Args:
      query: ``[B, Tq, N, H]``; any number of leading batch dims ``[..., Tq, N, H]``
        (flattened to one, :class:`~efficient_attn.core.batching.Batch`: mods see
        the flattened ``b``; ``kv_lengths`` ``[...]``, bias ``[..., N, Tq, Tk]``).
      key: ``[B, Tk, K, H]`` with ``N % K == 0`` (K < N: grouped/multi-query).
      value: ``[B, Tk, K, Hv]``.
      method: a name from :func:`efficient_attn.methods`.
      causal: bottom-right aligned: query ``i`` sees key ``j`` iff
        ``j <= i + Tk - Tq``.
      kv_lengths: int ``[B]``; keys at positions ``>= kv_lengths[b]`` are padding.
      scale: logit scale; default ``1/sqrt(H)`` (the method's own default
        where it defines one, e.g. 1.0 for ``additive``).
      mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` (FlexAttention; see
        :mod:`efficient_attn.core.mods`), ANDed with ``causal`` and ``kv_lengths``.
      score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` on the scaled
        logit ``scale * q.k``; gradients reach the arrays it closes over.
      block_mask: a :func:`efficient_attn.block_mask` of ``mask_mod`` built
        once and reused (else one is built for the call); its tiles are the
        method's tiles.
      bias: float, broadcastable to ``[B, N, Tq, Tk]``: added to the scaled
        logits before ``score_mod`` (methods with feature ``"bias"``);
        differentiable.
      dropout_rate, dropout_rng: inverted dropout on the weights
        (:class:`efficient_attn.core.masking.Dropout`: the same mask for every
        method supporting ``"dropout"``, regenerated tile by tile);
        ``dropout_broadcast``: one mask for all batch rows and heads.
      return_lse: also return the log-sum-exp of the visible logits
        ``[B, Tq, N]`` (``-inf`` for rows that see no key), differentiable
        (methods with feature ``"lse"``).
      **options: method options (see ``efficient-attn methods``), including
        the arrays a method requires (:func:`efficient_attn.init_arrays`).

    Returns:
      ``[B, Tq, N, Hv]`` in ``query.dtype`` (and ``lse`` with ``return_lse``).
      Rows that see no key are zero.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise ValueError(f"return_lse must be a bool; got {return_lse!r}")
    batch = Batch.of(query, key, value)
    if not batch.single:  # [..., T, N, H]: one batch dim for the method, then back
        arrays = {name: a.shape for name, a in get_method(method).arrays.items()}
        tail = (query.shape[-2], query.shape[-3], key.shape[-3])  # N, Tq, Tk
        res = attention(
            *map(batch.flatten, (query, key, value)), method=method, causal=causal,
            kv_lengths=batch.per_example("kv_lengths", kv_lengths), scale=scale,
            mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask,
            bias=batch.broadcast("bias", bias, tail), dropout_rate=dropout_rate,
            dropout_rng=dropout_rng, dropout_broadcast=dropout_broadcast,
            return_lse=return_lse, **batch.options(arrays, options),
        )  # fmt: skip
        return jax.tree.map(batch.unflatten, res)
    mods = {
        "mask_mod": mask_mod,
        "score_mod": score_mod,
        "block_mask": block_mask,
        "bias": bias,
        "dropout": masking.dropout(dropout_rate, dropout_rng, broadcast=dropout_broadcast),
        "return_lse": bool(return_lse),
    }
    spec, shapes, kv_lengths, scale, opts, kw = prepare(
        query, key, value, method, causal, kv_lengths, scale, options, mods
    )
    res = eager.compiled_call(
        spec.fn, query, key, value, causal=bool(causal), kv_lengths=kv_lengths, scale=scale,
        **kw, **opts,
    )  # fmt: skip
    out, lse = res if return_lse else (res, None)
    expected = (shapes.batch, shapes.q_len, shapes.heads, shapes.value_dim)
    if out.shape != expected:
        raise RuntimeError(f"method {method!r} returned shape {out.shape}, expected {expected}")
    if lse is not None and lse.shape != expected[:3]:
        raise RuntimeError(f"method {method!r} returned lse {lse.shape}, expected {expected[:3]}")
    return (out.astype(query.dtype), lse) if return_lse else out.astype(query.dtype)


def attention_weights(
    query: jax.Array,
    key: jax.Array,
    *,
    method: str = "dense",
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: BlockMask | None = None,
    **options: Any,
) -> jax.Array:
    """The explicit ``[B, N, Tq, Tk]`` float32 weights that ``method`` applies.

    ``einsum('bnqk,bknd->bqnd', weights, repeat(value))`` reproduces
    :func:`attention`. Materialises ``Tq x Tk`` per head: for small sizes
    (plots, approximation-error analysis).
    """
    query, key = jnp.asarray(query), jnp.asarray(key)
    mods = {"mask_mod": mask_mod, "score_mod": score_mod, "block_mask": block_mask}
    spec, _, kv_lengths, scale, opts, kw = prepare(
        query, key, None, method, causal, kv_lengths, scale, options, mods
    )
    kw = {k: v for k, v in kw.items() if k in mods}
    weights_fn = spec.weights
    if weights_fn is None:  # exact methods apply dense softmax weights
        weights_fn = get_method("dense").weights
        opts = {}
        kw = {"mask_mod": kw.get("mask_mod") or getattr(kw.get("block_mask"), "mask_mod", None),
              "score_mod": kw.get("score_mod")}  # fmt: skip
    else:
        kw.pop("block_mask", None)
    w = weights_fn(
        query, key, causal=bool(causal), kv_lengths=kv_lengths, scale=scale, **kw, **opts
    )
    return w.astype(jnp.float32)


def sparsity_pattern(method: str, tq: int, tk: int, *, causal: bool = False, **options: Any):
    """Boolean ``[tq, tk]`` NumPy array: the query-key pairs ``method`` lets interact.

    Includes the causal rule, excludes ``kv_lengths``. ``attention`` of a
    sparse method equals dense softmax attention restricted to this pattern.
    Methods without a pattern (dense, linear, ...) raise ``ValueError``.
    """
    spec = get_method(method)
    if spec.pattern is None:
        with_pattern = [m for m in methods() if get_method(m).pattern is not None]
        raise ValueError(
            f"method {method!r} has no sparsity pattern; methods with one: {with_pattern}"
        )
    if tq < 1 or tk < 1:
        raise ValueError(f"{tq=} and {tk=} must be >= 1")
    if "causal" not in spec.supports and causal:
        raise ValueError(f"method {method!r} does not support ['causal']")
    opts = spec.resolve_options(options)
    pattern = np.asarray(spec.pattern(tq, tk, causal=bool(causal), **opts), dtype=bool)
    if pattern.shape != (tq, tk):
        raise RuntimeError(f"{method!r} pattern has shape {pattern.shape}, expected {(tq, tk)}")
    return pattern
