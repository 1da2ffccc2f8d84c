"""Decoding cost: one new token against a KV cache, for MHA, GQA and MQA.

Per point (method, K/V heads K, context length L): the cache holds L
positions, ``k_cache, v_cache: [B, L, K, H]`` (capacity == context, so the
attended length is L without ``kv_lengths``). One decoding step writes the new
token's ``k_new, v_new: [B, 1, K, H]`` into the last slot with
``jax.lax.dynamic_update_slice`` (the cache buffers are donated, so the write
is in place) and attends with ``q: [B, 1, N, H]`` through
``ea.attention(q, k_cache, v_cache, method=m, causal=True)``: bottom-right
causal, the one query sees all L keys. ``cache_bytes`` is the sum of the cache
arrays' ``.nbytes``.

Methods with a recurrent form on their registry entry (``Method.recurrent``:
the linear and the gated/delta-rule methods, :func:`efficient_attn.recurrent_methods`)
decode from their recurrent state instead: the empty state
(:func:`efficient_attn.linear_init_state`) absorbs L - 1 random context tokens
once (not timed), then one :func:`efficient_attn.linear_step` (absorb the new
token, read out with its query) is timed; ``cache_bytes`` is the state's size,
independent of L. Per-token inputs (``log_decay``, ``beta``) are drawn by the
method's initialisers (``ea.init_arrays``) for the L tokens and passed to each step.

Time: the compiled step is warmed up, then timed ``repeats`` times (fewer
where one step takes more than ``timing_budget_s / repeats``), each call
blocked on with ``block_until_ready``; ``time_ms`` is the median.
``temp_bytes`` is XLA's compiled temporary memory of the step. Methods that
cannot decode (not available here, or lacking the ``causal``/``cross``/``gqa``
features a one-token query over a cache needs) give ``unsupported`` rows.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from efficient_attn.studies.base import Study, Unsupported, positive_number
from efficient_attn.sweep import report as sweep_report
from efficient_attn.sweep.spec import DTYPES, as_list, check_methods, int_list, option_grid

SETTINGS: dict[str, Any] = {
    "methods": [
        "dense",
        "blockwise",
        "xla",
        "local",
        "linear_elu",
        "performer",
        "retnet",
        "mamba2",
        "gla",
        "deltanet",
        "gated_deltanet",
    ],
    "seq_lens": [1024, 2048, 4096, 8192, 16384, 32768],
    "batch": 1,
    "heads": 8,
    "kv_heads": "auto",  # N, N/4 and 1 (MHA, GQA, MQA), or a list dividing heads
    "head_dim": 64,
    "dtype": "float32",
    "options": {},
    "repeats": 10,
    "warmup": 2,
    "timing_budget_s": 2.0,
    "seed": 0,
}
FLAGS: dict[str, str] = {
    "methods": "methods",
    "seq_lens": "seq_lens",
    "batch": "batch",
    "heads": "heads",
    "kv_heads": "kv_heads",
    "head_dim": "head_dim",
    "dtype": "dtype",
    "option": "options",
    "repeats": "repeats",
}
MEASUREMENTS: tuple[str, ...] = (
    "resolved_options",
    "decode_form",
    "cache_bytes",
    "cache_shapes",
    "temp_bytes",
    "compile_s",
    "repeats",
    "time_ms",
    "time_ms_min",
    "time_ms_max",
    "times_ms",
    "cache_gb_per_s",
)


def attention_kind(heads: int, kv_heads: int) -> str:
    """``"MHA"`` (K = N), ``"MQA"`` (K = 1) or ``"GQA"``."""
    return "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else "GQA"


def kv_heads_for(heads: int, setting: Any) -> list[int]:
    """K/V head counts for ``heads`` query heads: ``"auto"`` is N, N/4 (if whole) and 1."""
    if setting == "auto":
        values = [heads, heads // 4 if heads % 4 == 0 else heads, 1]
        return list(dict.fromkeys(values))
    values = int_list("kv_heads", setting)
    for k in values:
        if heads % k:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(f"kv_heads={k} must divide heads={heads}; valid kv_heads: {divisors}")
    return values


def points(settings: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """One payload per (dtype, batch, heads, head_dim, K, method, options, length)."""
    import efficient_attn as ea

    methods = check_methods(as_list("methods", settings["methods"]), ea.methods())
    dtypes = as_list("dtype", settings["dtype"])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"dtype={bad[0]!r} is not valid; valid values: {', '.join(DTYPES)}")
    options = settings["options"]
    if not isinstance(options, Mapping):
        raise ValueError("options must be a table: [options.METHOD] NAME = value or [values]")
    run = {
        "repeats": int_list("repeats", settings["repeats"])[0],
        "warmup": int_list("warmup", settings["warmup"])[0],
        "timing_budget_s": positive_number("timing_budget_s", settings["timing_budget_s"]),
    }
    seed = int_list("seed", settings["seed"], minimum=0)[0]
    out = []
    for dtype, b, n, h in itertools.product(
        dtypes,
        int_list("batch", settings["batch"]),
        int_list("heads", settings["heads"]),
        int_list("head_dim", settings["head_dim"]),
    ):
        for kh, method in itertools.product(kv_heads_for(n, settings["kv_heads"]), methods):
            for opts in option_grid(method, options.get(method, {})):
                family = (
                    f"decode|{method}|{json.dumps(opts, sort_keys=True, separators=(',', ':'))}"
                    f"|B{b}|N{n}|K{kh}|H{h}|{dtype}|seed{seed}"
                )
                for t in int_list("seq_lens", settings["seq_lens"]):
                    out.append(
                        {
                            "experiment": "decode",
                            "key": family.replace("|B", f"|L{t}|B", 1),
                            "family": family,
                            "label": f"{sweep_report.variant({'method': method, 'options': opts})}"
                            f" K={kh} L={t}",
                            "method": method,
                            "options": opts,
                            "seq_len": t,
                            "batch": b,
                            "heads": n,
                            "kv_heads": kh,
                            "attention": attention_kind(n, kh),
                            "head_dim": h,
                            "dtype": dtype,
                            "seed": seed,
                            "run": run,
                        }
                    )
    return sorted(out, key=lambda p: p["seq_len"])


def _normals(seed: int, dtype) -> Callable[..., Any]:
    """``normal(*shape)``: standard normal arrays of ``dtype`` from NumPy (no JAX compiles)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _kv_cache_step(method: str, options: dict, b, t, n, kh, h, dtype, seed) -> tuple:
    """(cache, inputs, step): ``step(cache, q, k_new, v_new, pos) -> (out, cache)``."""
    import jax

    import efficient_attn as ea

    normal = _normals(seed, dtype)
    cache = (normal(b, t, kh, h), normal(b, t, kh, h))
    q, k_new, v_new = normal(b, 1, n, h), normal(b, 1, kh, h), normal(b, 1, kh, h)
    arrays = ea.init_arrays(method, jax.random.PRNGKey(seed), h, dtype=dtype)

    def step(cache, q, k_new, v_new, pos):
        k_cache, v_cache = (
            jax.lax.dynamic_update_slice(c, x, (0, pos, 0, 0))
            for c, x in zip(cache, (k_new, v_new), strict=True)
        )  # [B, L, K, H]
        out = ea.attention(q, k_cache, v_cache, method=method, causal=True, **options, **arrays)
        return out, (k_cache, v_cache)

    return cache, (q, k_new, v_new, jax.numpy.int32(t - 1)), step


def _recurrent_step(method: str, options: dict, b, t, n, kh, h, dtype, seed) -> tuple:
    """(state after L - 1 tokens, inputs, step): ``step(state, q, k, v) -> (out, state)``."""
    import functools

    import jax
    import jax.numpy as jnp

    import efficient_attn as ea

    normal = _normals(seed, dtype)
    state = ea.linear_init_state(method, b, kh, h, h, dtype=dtype, **options)
    q0 = jnp.zeros((b, n, h), dtype)
    spec = ea.get_method(method)
    arrays = ea.init_arrays(method, jax.random.PRNGKey(seed), h, B=b, T=t, K=kh)
    fixed = {name: x for name, x in arrays.items() if not spec.arrays[name].per_token}
    tokens = {  # per-token inputs, [L, B, K, ...]: L - 1 for the context, the last for the step
        name: jnp.swapaxes(x, 0, 1) for name, x in arrays.items() if spec.arrays[name].per_token
    }

    @functools.partial(jax.jit, donate_argnums=0)
    def absorb(state, ks, vs, context):  # ks, vs: [L - 1, B, K, H]
        def body(s, xs):
            k_t, v_t, tok = xs
            return ea.linear_step(method, s, q0, k_t, v_t, **options, **fixed, **tok)[1], None

        return jax.lax.scan(body, state, (ks, vs, context))[0]

    if t > 1:
        context = {name: x[: t - 1] for name, x in tokens.items()}
        ks, vs = normal(t - 1, b, kh, h), normal(t - 1, b, kh, h)
        state = jax.block_until_ready(absorb(state, ks, vs, context))
    q, k_new, v_new = normal(b, n, h), normal(b, kh, h), normal(b, kh, h)
    last = {name: x[t - 1] for name, x in tokens.items()}

    def step(state, q, k_new, v_new, last):
        return ea.linear_step(method, state, q, k_new, v_new, **options, **fixed, **last)

    return state, (q, k_new, v_new, last), step


def _time_steps(exe, carry, inputs, repeats: int, warmup: int, budget_s: float) -> tuple:
    """(seconds per step, last output): the donated ``carry`` is threaded through the calls."""
    import jax

    first = 0.0
    for i in range(warmup):
        start = time.perf_counter()
        out, carry = jax.block_until_ready(exe(carry, *inputs))
        first = time.perf_counter() - start if i == 0 else first
    repeats = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, carry = jax.block_until_ready(exe(carry, *inputs))
        times.append(time.perf_counter() - start)
    return times, out


def measure(payload: dict[str, Any], row: dict[str, Any]) -> None:
    """Time one decoding step of ``payload``'s point and record its cache size."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import efficient_attn as ea

    spec = ea.get_method(payload["method"])
    reason = spec.available()
    if reason is not None:
        raise Unsupported(f"method {spec.name!r} is not available here: {reason}")
    b, t, n, kh, h = (payload[x] for x in ("batch", "seq_len", "heads", "kv_heads", "head_dim"))
    recurrent = spec.recurrent is not None
    needed = ["causal", "cross"] + (["gqa"] if kh != n else [])
    missing = [f for f in needed if f not in spec.supports]
    if missing and not recurrent:
        raise Unsupported(
            f"method {spec.name!r} cannot decode: it lacks {missing} (a one-token query over "
            f"a cache of {kh} K/V heads needs {needed}); it supports {sorted(spec.supports)}"
        )
    options = spec.resolve_options(payload["options"])
    build = _recurrent_step if recurrent else _kv_cache_step
    carry, inputs, step = build(
        spec.name, options, b, t, n, kh, h, jnp.dtype(payload["dtype"]), payload["seed"]
    )
    leaves = jax.tree_util.tree_leaves_with_path(carry)
    row["resolved_options"] = options
    row["decode_form"] = "recurrent state" if recurrent else "kv cache"
    row["cache_bytes"] = int(sum(x.nbytes for _, x in leaves))
    row["cache_shapes"] = {jax.tree_util.keystr(p): list(x.shape) for p, x in leaves}
    start = time.perf_counter()
    exe = jax.jit(step, donate_argnums=0).lower(carry, *inputs).compile()
    row["compile_s"] = time.perf_counter() - start
    memory = exe.memory_analysis()
    row["temp_bytes"] = None if memory is None else int(memory.temp_size_in_bytes)
    run = payload["run"]
    times, out = _time_steps(
        exe, carry, inputs, run["repeats"], run["warmup"], run["timing_budget_s"]
    )
    if not bool(np.isfinite(np.asarray(out, np.float32)).all()):
        raise FloatingPointError("the decoded output contains NaN or Inf")
    times_ms = [s * 1e3 for s in times]
    row.update(
        repeats=len(times_ms),
        time_ms=statistics.median(times_ms),
        time_ms_min=min(times_ms),
        time_ms_max=max(times_ms),
        times_ms=times_ms,
    )
    row["cache_gb_per_s"] = row["cache_bytes"] / (row["time_ms"] * 1e-3) / 1e9


def describe(row: dict[str, Any]) -> str:
    return f"{row['time_ms']:.3g} ms/token, cache {row['cache_bytes'] / 2**20:.3g} MiB"


# ---- report ---------------------------------------------------------------------------------


def _variant(row: dict[str, Any]) -> str:
    return f"{sweep_report.variant(row)} K={row['kv_heads']} ({row['attention']})"


def _panels(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault((r["batch"], r["heads"], r["head_dim"], r["dtype"]), []).append(r)
    return panels


def _cell(row: dict[str, Any] | None, value: Callable[[dict], float]) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return {"oom": "OOM", "unsupported": "n/a"}.get(row["status"], row["status"])
    v = value(row)
    return "n/c" if v is None else sweep_report.fmt_value(v)


def _mib(row: dict[str, Any]) -> float:
    return row["cache_bytes"] / 2**20


def _temp_mib(row: dict[str, Any]) -> float | None:
    return None if row["temp_bytes"] is None else row["temp_bytes"] / 2**20


def _table(rows, value: Callable[[dict], float]) -> tuple[list[str], list[list[str]]]:
    lengths = sorted({r["seq_len"] for r in rows})
    cells: dict[str, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault(_variant(r), {})[r["seq_len"]] = r
    header = ["method (K/V heads)", *(f"{t:,}" for t in lengths), "exponent"]
    body = []
    for name, by_len in cells.items():
        ok = {t: value(r) for t, r in by_len.items() if r["status"] == "ok"}
        ok = {t: v for t, v in ok.items() if v is not None}
        slope = sweep_report.fit_exponent(ok)
        body.append(
            [
                name,
                *(_cell(by_len.get(t), value) for t in lengths),
                "–" if slope is None else f"{slope:.2f}",
            ]
        )
    return header, body


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


def summary(rows: list[dict[str, Any]]) -> str:
    """MHA vs MQA at the longest context per method, and the linear methods' constant state."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "No point ran."
    longest = max(r["seq_len"] for r in ok)
    at = {(r["method"], r["kv_heads"], r["heads"]): r for r in ok if r["seq_len"] == longest}
    parts = []
    for (method, kh, n), mha in at.items():
        mqa = at.get((method, 1, n))
        if kh != n or mqa is None or n == 1:
            continue
        t_ratio = mha["time_ms"] / mqa["time_ms"]
        parts.append(
            f"{method}: MHA (K={n}) {mha['time_ms']:.3g} ms/token with a "
            f"{_fmt_bytes(mha['cache_bytes'])} "
            f"{'state' if mha['decode_form'] != 'kv cache' else 'cache'}, "
            f"MQA (K=1) {mqa['time_ms']:.3g} ms with {_fmt_bytes(mqa['cache_bytes'])} "
            f"({mha['cache_bytes'] / mqa['cache_bytes']:.0f}x smaller, "
            + (f"{t_ratio:.2g}x faster)" if t_ratio >= 1 else f"{1 / t_ratio:.2g}x slower)")
        )
    text = f"At the longest context, {longest:,} tokens: " + "; ".join(parts) + "."
    copies = [
        r
        for r in at.values()
        if r["decode_form"] == "kv cache"
        and r["kv_heads"] == r["heads"]
        and (r["temp_bytes"] or 0) >= 0.9 * r["cache_bytes"]
    ]
    if copies:
        text += (
            " The compiled step of "
            + ", ".join(f"{r['method']} ({_fmt_bytes(r['temp_bytes'])})" for r in copies)
            + " needs temp memory at least 0.9x its MHA cache: the cache is copied every token."
        )
    constant = sorted(
        {
            r["method"]
            for r in ok
            if r["decode_form"] != "kv cache"
            and len({x["cache_bytes"] for x in ok if x["family"] == r["family"]}) == 1
        }
    )
    if constant:
        text += (
            f" The recurrent state of {', '.join(constant)} has the same size at every length, "
            "where a KV cache grows linearly."
        )
    return text


def report(rows: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str], list[Path]]:
    """Time per token and cache size tables (per shape) and their log-log plots."""
    try:
        from efficient_attn.studies import plots
    except ImportError:
        plots = None
    md: list[str] = [
        "Time: median per decoded token (ms) over repeats after warm-up; cache: the K/V "
        "cache arrays' bytes (linear methods: their recurrent state) in MiB. Exponent: "
        f"log-log slope over the {sweep_report.FIT_POINTS} longest lengths. n/a: the method "
        "cannot decode here (see the notes).",
        "",
        f"**What it shows.** {summary(rows)}",
    ]
    tex, files = [], []
    for (b, n, h, dtype), panel in _panels(rows).items():
        title = f"batch {b}, {n} query heads, head dim {h}, {dtype}"
        slug = f"b{b}-n{n}-h{h}-{dtype}"
        md += ["", f"## {title}", ""]
        if plots is not None:
            figure = plots.decode_plot(panel, out / f"decode-{slug}", title)
            files += figure
            md += [f"![decode]({figure[0].name})", ""] if figure else []
        for what, value, unit in (
            ("Time per token", lambda r: r["time_ms"], "ms, median"),
            ("Cache size", _mib, "MiB"),
            ("Compiled temp memory of the step", _temp_mib, "MiB"),
        ):
            header, body = _table(panel, value)
            md += [f"**{what}** ({unit})", "", sweep_report.markdown_table(header, body), ""]
            caption = f"Decoding: {what.lower()} ({unit}) vs context length; {title}."
            tex.append(
                sweep_report.latex_table(header, body, caption, f"tab:decode-{what[:4]}-{slug}")
            )
    return md, tex, files


STUDY = Study(
    name="decode",
    settings=SETTINGS,
    flags=FLAGS,
    measurements=MEASUREMENTS,
    points=points,
    measure=measure,
    report=report,
    summary=summary,
    describe=describe,
)
