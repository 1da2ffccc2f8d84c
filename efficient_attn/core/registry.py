"""The method registry: one record per attention method, filled by one decorator.

A method is a function ``fn(q, k, v, *, causal, kv_lengths, scale, **options)``
with ``q: [B, Tq, N, H]``, ``k: [B, Tk, K, H]``, ``v: [B, Tk, K, Hv]`` returning
``[B, Tq, N, Hv]``. Its options are its remaining keyword-only parameters; each
must have a default, which is the method's recommended setting. A method may
also *require* array options (learned projections, e.g. ``additive``): it
declares them with :class:`ArrayOption` (shape and initialiser), callers create
them with :func:`init_arrays`, and the Flax layer learns them as parameters.
*Per-token* array options (shape starting ``("B", "T", ...)``, e.g. the
decays of ``gla``) are inputs of the call like ``k``: their initialiser draws
realistic values, and the Flax layer computes them from its input with a
learned :class:`TokenProjection`. Methods that are causal recurrences
(``causal_only``) record their token-by-token form (:class:`Recurrent`) for decoding.
The API checks shapes, dtypes, ``kv_lengths``, option names and array shapes
before a method is called, so a method only has to compute.

Each method belongs to one of the :data:`FAMILIES` (``family=``; derived from
what it declares when not given), by which reports colour and group methods.
The capability records (:data:`FAMILIES`, :data:`FEATURES`, :class:`ArrayOption`,
:class:`TokenProjection`, :class:`Recurrent`, :class:`Native`) are defined in
:mod:`efficient_attn.core.capabilities` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from efficient_attn.core.capabilities import _FEATURE_KWARGS, _STANDARD_KWARGS
from efficient_attn.core.capabilities import BASIC_FEATURES as BASIC_FEATURES
from efficient_attn.core.capabilities import BOUND_DIMS as BOUND_DIMS
from efficient_attn.core.capabilities import FAMILIES as FAMILIES
from efficient_attn.core.capabilities import FEATURES as FEATURES
from efficient_attn.core.capabilities import HEAD_DIM as HEAD_DIM
from efficient_attn.core.capabilities import MOD_FEATURES as MOD_FEATURES
from efficient_attn.core.capabilities import ArrayOption as ArrayOption
from efficient_attn.core.capabilities import Native as Native
from efficient_attn.core.capabilities import Recurrent as Recurrent
from efficient_attn.core.capabilities import TokenProjection as TokenProjection
from efficient_attn.core.capabilities import default_family as default_family


def _default_scale(head_dim: int) -> float:
    return 1.0 / float(np.sqrt(head_dim))


@dataclasses.dataclass(frozen=True)
class Method:
    """What the registry knows about one attention method.

    Attributes:
      name: registered name, used as ``method=name``.
      fn: the attention function.
      exact: True when the method equals full softmax attention (up to
        floating-point error); exact methods are compared with a float64
        reference in the conformance suite.
      options: option name -> default value, read from ``fn``'s signature.
      supports: the subset of :data:`FEATURES` the method implements.
      weights: ``weights(q, k, *, causal, kv_lengths, scale, **options)``
        returning the ``[B, N, Tq, Tk]`` float32 matrix the method applies, or
        None for exact methods (their weights are dense softmax weights).
      pattern: ``pattern(tq, tk, *, causal, **options) -> bool [tq, tk]``,
        the query-key pairs a sparse method lets interact, or None.
      available: returns None when the method can run on the default backend,
        else the reason it cannot.
      description: first line of ``fn``'s docstring.
      arrays: array option name -> :class:`ArrayOption`: arrays the method
        requires (keyword-only parameters of ``fn`` defaulting to None).
      sizes: default sizes of the named dimensions of ``arrays``.
      default_scale: ``head_dim -> scale`` used when ``scale=None``
        (``1/sqrt(head_dim)`` unless the method defines its own).
      reference: optional float64 NumPy formula
        ``reference(q, k, v, *, causal, kv_lengths, scale, **options) -> out``
        of a method that defines its own function (not softmax attention);
        the conformance suite and the sweep compare the method with it.
      ring: ``ring(**options) -> (forward, backward)``, the method's exact
        (out, lse) kernels on explicit positions for ``strategy="ring"``
        (see :mod:`efficient_attn.parallel.kernels`), or None.
      causal_only: the method is a causal recurrence over its keys: it
        requires ``causal=True`` (the API raises ``ValueError`` otherwise).
      recurrent: its token-by-token form for decoding, or None.
      native: for wrappers of a library's attention (``xla``, ``cudnn``),
        what :func:`efficient_attn.dot_product_attention` calls instead of
        translating its arguments into mods (:class:`Native`), or None.
      family: one of :data:`FAMILIES` (``"full"``, ``"sparse"``, ``"linear"``,
        ``"gated"``, ``"other"``): the kind of attention, by which reports
        colour and group methods.
    """

    name: str
    fn: Callable[..., Any]
    exact: bool
    options: Mapping[str, Any]
    supports: frozenset[str]
    weights: Callable[..., Any] | None = None
    pattern: Callable[..., Any] | None = None
    available: Callable[[], str | None] = lambda: None
    description: str = ""
    arrays: Mapping[str, ArrayOption] = dataclasses.field(default_factory=dict)
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    default_scale: Callable[[int], float] = _default_scale
    reference: Callable[..., Any] | None = None
    ring: Callable[..., Any] | None = None
    causal_only: bool = False
    recurrent: Recurrent | None = None
    native: Native | None = None
    family: str = "other"

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``; unknown names raise ``ValueError``.

        Array options are passed through unchecked (the API checks their shapes).
        """
        unknown = sorted(set(given) - set(self.options) - set(self.arrays))
        if unknown:
            valid = ", ".join(sorted([*self.options, *self.arrays])) or "none"
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; valid options: {valid}"
            )
        return {**self.options, **given}

    def array_shapes(
        self, head_dim: int, *, per_token: bool = True, **sizes: int
    ) -> dict[str, tuple[int, ...]]:
        """Concrete shape of each array option for ``head_dim`` and ``sizes`` (else defaults).

        ``sizes`` may also bind ``B``, ``T``, ``K`` (batch, key length, K/V heads),
        which arrays naming them need; ``per_token=False`` leaves out per-token arrays.
        """
        unknown = sorted(set(sizes) - set(self.sizes) - set(BOUND_DIMS))
        if unknown:
            valid = ", ".join(f"{k}={v}" for k, v in self.sizes.items()) or "none"
            raise ValueError(
                f"method {self.name!r} has no size(s) {unknown}; its sizes: {valid} "
                "(and B, T, K for arrays that name them)"
            )
        dims = {**self.sizes, **sizes, HEAD_DIM: head_dim}
        for name, value in dims.items():
            positive_int(name, value)
        arrays = {n: a for n, a in self.arrays.items() if per_token or not a.per_token}
        for name, a in arrays.items():
            unbound = [d for d in a.shape if d not in dims]
            if unbound:
                raise ValueError(
                    f"array {name} [{', '.join(a.shape)}] of method {self.name!r} needs "
                    f"size(s) {unbound} (e.g. B=batch, T=key length, K=kv_heads)"
                )
        return {name: tuple(dims[d] for d in a.shape) for name, a in arrays.items()}


_REGISTRY: dict[str, Method] = {}


def _options_from_signature(
    name: str, fn: Callable[..., Any], arrays: Mapping[str, ArrayOption], supports: frozenset
) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    mods = [kw for f, kws in _FEATURE_KWARGS.items() if f in supports for kw in kws]
    missing = [p for p in (*_STANDARD_KWARGS, *mods, *arrays) if p not in params]
    if missing:
        raise TypeError(f"method {name!r}: fn must accept keyword arguments {missing}")
    reserved = (*_STANDARD_KWARGS, *(kw for kws in _FEATURE_KWARGS.values() for kw in kws), *arrays)
    options = {}
    for p in params.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in reserved:
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"method {name!r}: option {p.name!r} needs a default value")
        options[p.name] = p.default
    return options


def register_method(
    name: str,
    *,
    exact: bool,
    supports: tuple[str, ...] | frozenset[str] = BASIC_FEATURES,
    weights: Callable[..., Any] | None = None,
    pattern: Callable[..., Any] | None = None,
    available: Callable[[], str | None] | None = None,
    arrays: Mapping[str, ArrayOption] | None = None,
    sizes: Mapping[str, int] | None = None,
    default_scale: Callable[[int], float] | None = None,
    reference: Callable[..., Any] | None = None,
    ring: Callable[..., Any] | None = None,
    causal_only: bool = False,
    recurrent: Recurrent | None = None,
    native: Native | None = None,
    family: str | None = None,
    replace: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(q, k, v, *, causal, kv_lengths, scale, **options)``.

    Example::

        @ea.register_method("my_method", exact=False, weights=my_weights)
        def my_method(q, k, v, *, causal, kv_lengths, scale, width: int = 64):
            ...

    Args:
      name: the name users pass as ``method=``.
      exact: whether the method equals softmax attention.
      supports: features from :data:`FEATURES` the method implements (default
        :data:`BASIC_FEATURES`; a method supporting ``"mask_mod"`` accepts
        ``mask_mod=`` and ``block_mask=``, ``"score_mod"`` ``score_mod=``,
        ``"bias"`` ``bias=``, ``"dropout"`` ``dropout=`` and ``"lse"``
        ``return_lse=`` (then returning ``(out, lse)``); the API passes
        them only to such methods).
      weights: explicit-weights function; required for approximate methods.
      pattern: sparsity-pattern function for sparse methods.
      available: platform check returning None or the reason it cannot run.
      arrays: array options the method requires (see :class:`ArrayOption`).
      sizes: default sizes of the dimension names used in ``arrays``.
      default_scale: ``head_dim -> scale`` when the caller passes no scale.
      reference: float64 NumPy formula of a method that is not softmax attention.
      ring: factory of the method's ring-attention kernels (exact methods).
      causal_only: the method is a causal recurrence (needs ``causal=True``).
      recurrent: its token-by-token form for decoding (:class:`Recurrent`).
      native: the library call the drop-in makes for a wrapper (:class:`Native`).
      family: one of :data:`FAMILIES`; default :func:`default_family` of the
        above (exact -> ``"full"``, a ``pattern`` -> ``"sparse"``, causal-only
        -> ``"gated"``, a ``recurrent`` form -> ``"linear"``, else ``"other"``).
      replace: allow re-registering an existing name.
    """
    unknown = sorted(set(supports) - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; valid features: {', '.join(FEATURES)}")
    if family is None:
        family = default_family(
            exact=exact,
            sparse=pattern is not None,
            causal_only=causal_only,
            recurrent=recurrent is not None,
        )
    elif family not in FAMILIES:
        raise ValueError(
            f"method {name!r}: unknown family={family!r}; valid families: {', '.join(FAMILIES)}"
        )
    if not exact and weights is None:
        raise ValueError(f"approximate method {name!r} must provide weights=")
    arrays, sizes = dict(arrays or {}), dict(sizes or {})
    named = {d for a in arrays.values() for d in a.shape} - set(BOUND_DIMS)
    if named != set(sizes):
        raise ValueError(
            f"method {name!r}: sizes= must give a default for each dimension named in "
            f"arrays= other than {BOUND_DIMS}: expected {sorted(named)}, got {sorted(sizes)}"
        )
    unprojected = [n for n, a in arrays.items() if a.per_token and a.project is None]
    if unprojected:
        raise ValueError(f"method {name!r}: per-token array(s) {unprojected} need project=")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not replace:
            raise ValueError(f"method {name!r} is already registered (pass replace=True)")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = Method(
            name=name,
            fn=fn,
            exact=exact,
            options=_options_from_signature(name, fn, arrays, frozenset(supports)),
            supports=frozenset(supports),
            weights=weights,
            pattern=pattern,
            available=available or (lambda: None),
            description=doc.splitlines()[0] if doc else "",
            arrays=arrays,
            sizes=sizes,
            default_scale=default_scale or _default_scale,
            reference=reference,
            ring=ring,
            causal_only=causal_only,
            recurrent=recurrent,
            native=native,
            family=family,
        )
        return fn

    return decorator


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else ``ValueError``.

    For methods validating their integer options (tile sizes, chunks, features).
    """
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


def init_arrays(
    method: str, key: Any, head_dim: int, *, dtype: Any = None, **sizes: int
) -> dict[str, Any]:
    """Fresh array options of ``method`` (empty for methods that need none).

    ``ea.attention(q, k, v, method=m, **ea.init_arrays(m, key, q.shape[-1]))``
    works for every registered method. ``sizes`` override the method's
    default dimension sizes (e.g. ``A=128`` for ``additive``); methods with
    per-token arrays (``gla``) also need ``B``, ``T``, ``K`` (batch, key
    length, K/V heads), for which the arrays' initialisers draw realistic values.

    Args:
      method: a registered method name.
      key: a ``jax.random`` key (split once per array).
      head_dim: H of the queries and keys.
      dtype: dtype of the arrays (default float32).
    """
    import jax
    import jax.numpy as jnp

    spec = get_method(method)
    shapes = spec.array_shapes(head_dim, **sizes)
    dtype = jnp.float32 if dtype is None else dtype
    keys = jax.random.split(key, max(len(shapes), 1))
    return {
        name: spec.arrays[name].init(k, shape, dtype)
        for k, (name, shape) in zip(keys, shapes.items(), strict=False)
    }


def methods_supporting(feature: str) -> tuple[str, ...]:
    """Registered methods that declare ``feature`` (for error messages and docs)."""
    return tuple(n for n, m in _REGISTRY.items() if feature in m.supports)


def methods() -> tuple[str, ...]:
    """Names of all registered methods, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The registry record of ``name``; unknown names raise ``ValueError``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(_REGISTRY)}"
        ) from None


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive work)."""
    get_method(name)
    del _REGISTRY[name]
