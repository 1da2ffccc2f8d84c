"""Sweeps: presets, shards, worker rows, resume after a kill, failures as rows, reports."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

import efficient_attn as ea
import efficient_attn.sweep
from efficient_attn import cli
from efficient_attn.sweep import pool as pool_mod
from efficient_attn.sweep import report, runner, spec, worker

ROW_FIELDS = {
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
    "repeats",
    "status",
    "message",
    "time_ms",
    "time_ms_min",
    "time_ms_max",
    "time_ms_std",
    "compile_s",
    "flops",
    "flops_per_s",
    "memory_bytes",
    "peak_bytes",
    "rel_error",
    "grad_rel_error",
    "rel_error_note",
    "env",
}
PASSES = ["fwd", "fwd+bwd"]
ENV_FIELDS = {"jax", "jaxlib", "flax", "platform", "device_kind", "device_count", "git_commit"}

TINY = """
description = "tiny"
methods = ["dense"]
batch = 1
heads = 2
head_dim = 8
repeats = 2
timeout_s = 120
passes = ["fwd+bwd"]
seq_lens = [16]
[[grid]]
[[grid]]
methods = ["no_such_method"]
"""


def _sweep(text: str, tmp_path: Path, **overrides) -> spec.Sweep:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    name, data = spec.load_preset(str(path))
    return spec.build_sweep(name, data, overrides, ea.methods())


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_cli_sweep_rows_resume_after_torn_line_and_report(tmp_path, capsys):
    """End to end in fresh workers: full rows, resume skips, a torn last row is redone once."""
    preset, out = tmp_path / "tiny.toml", tmp_path / "out"
    preset.write_text(TINY)
    assert cli.main(["sweep", str(preset), "--out", str(out)]) == 0
    results = out / "results.jsonl"
    rows = runner.read_rows(results)
    assert len(rows) == 2 and len(_lines(results)) == 2
    by = {r["method"]: r for r in rows}
    ok = by["dense"]
    for r in rows:
        assert not ROW_FIELDS - set(r), ROW_FIELDS - set(r)
        assert not ENV_FIELDS - set(r["env"])
    assert ok["status"] == "ok" and ok["pass"] == "fwd+bwd"
    assert ok["rel_error"] < 1e-5 and ok["grad_rel_error"] < 1e-5
    assert set(ok["grad_rel_errors"]) == {"dq", "dk", "dv"}
    assert ok["time_ms_min"] <= ok["time_ms"] <= ok["time_ms_max"] and ok["compile_s"] > 0
    assert ok["flops_per_s"] == pytest.approx(ok["flops"] / ok["time_ms"] * 1e3)
    assert ok["flops"] == pytest.approx(3.5 * 4 * 2 * 16 * 16 * 8 / 2)
    assert ok["memory_bytes"] >= ok["memory_argument_bytes"] > 0
    unsupported = by["no_such_method"]
    assert unsupported["status"] == "unsupported" and "dense" in unsupported["message"]
    assert (out / "report.md").is_file() and "dense" in capsys.readouterr().out

    assert cli.main(["sweep", str(preset), "--out", str(out), "--no-report"]) == 0
    assert len(_lines(results)) == 2  # resumed: nothing ran again

    text = results.read_text()
    torn_key = json.loads(text.splitlines()[-1])["key"]
    results.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 40])  # kill mid-write
    assert len(runner.read_rows(results)) == 1
    assert cli.main(["sweep", str(preset), "--out", str(out), "--no-report"]) == 0
    keys = [r["key"] for r in runner.read_rows(results)]
    assert sorted(keys) == sorted(r["key"] for r in rows) and keys[-1] == torn_key
    assert len(_lines(results)) == 3  # the torn line stays, unparsed; the redone row is whole


@pytest.mark.parametrize(
    "signal_name,status", [("SIGKILL", "oom"), ("SIGSEGV", "error")], ids=["killed", "crashed"]
)
def test_crashing_worker_becomes_a_row_and_the_sweep_goes_on(
    tmp_path, monkeypatch, signal_name, status
):
    monkeypatch.setenv(worker.CRASH_ENV, f"no_such_method:{signal_name}")
    sweep = _sweep(TINY, tmp_path, methods=["no_such_method", "next_method"])
    outcome = runner.run_sweep(sweep, tmp_path / "out", stream=None)
    rows = {r["method"]: r for r in runner.read_rows(outcome.path)}
    assert rows["no_such_method"]["status"] == status
    assert signal_name in rows["no_such_method"]["message"]
    assert rows["no_such_method"]["env"]["jax"]  # the runner's environment block
    assert rows["next_method"]["status"] == "unsupported"  # the next point still ran


def test_unknown_option_is_an_error_row(tmp_path):
    text = TINY.replace("[[grid]]", "[options.dense]\nbogus = 3\n[[grid]]", 1)
    sweep = _sweep(text, tmp_path, methods=["dense"], passes=["fwd"])
    outcome = runner.run_sweep(sweep, tmp_path / "out", stream=None)
    (row,) = runner.read_rows(outcome.path)
    assert (
        row["status"] == "error" and "bogus" in row["message"] and "valid options" in row["message"]
    )
    assert row["options"] == {"bogus": 3} and row["time_ms"] is None


def test_worker_unsupported_feature_and_reference_limit():
    """In-process worker: a missing feature is 'unsupported'; big points skip the reference."""

    @ea.register_method("_fwd_only", exact=True, supports=("causal",))
    def fwd_only(q, k, v, *, causal, kv_lengths, scale):
        return ea.attention(q, k, v, causal=causal, scale=scale)

    try:
        point = spec.Point("_fwd_only", {}, 8, 1, 2, 2, 4, "float32", True, "fwd+bwd")
        payload = {**point.identity(), "repeats": 1, "warmup": 1, "reference_max_elements": 0}
        row = worker.run_point(payload)
        assert row["status"] == "unsupported" and "['grad']" in row["message"]
        row = worker.run_point({**payload, "pass": "fwd"})
        assert row["status"] == "ok" and row["rel_error"] is None
        assert "reference_max_elements" in row["rel_error_note"]
        row = worker.run_point({**payload, "pass": "fwd", "reference_max_elements": 10**6})
        assert row["rel_error"] < 1e-5 and row["grad_rel_error"] is None
    finally:
        ea.core.registry.unregister_method("_fwd_only")


_FAKE_WORKER = """
import json, os, sys, time
for line in sys.stdin:
    p = json.loads(line)
    if p["seq_len"] == 64:
        time.sleep(60)
    if p["seq_len"] == 32:
        sys.exit(3)
    status = "oom" if p["method"] == "xla" else "ok"
    print("noise on stdout")
    row = {**p, "status": status, "message": "RESOURCE_EXHAUSTED" * (status == "oom")}
    print(json.dumps({**row, "worker_pid": os.getpid()}), flush=True)
"""


def test_timeouts_exits_and_infeasible_lengths(tmp_path):
    """Fake workers: a timeout and a silent exit become error rows; after an OOM, longer
    lengths of that method are recorded without running."""
    sweep = _sweep(TINY, tmp_path, methods=["dense", "xla"], passes=["fwd"], seq_lens=[16, 32, 64])
    sweep = dataclasses.replace(sweep, timeout_s=1.0)
    command = (sys.executable, "-c", _FAKE_WORKER)
    outcome = runner.run_sweep(sweep, tmp_path / "out", stream=None, command=command)
    rows = {(r["method"], r["seq_len"]): r for r in runner.read_rows(outcome.path)}
    assert len(rows) == 6
    assert rows[("dense", 16)]["status"] == "ok"
    assert rows[("dense", 32)]["status"] == "error"
    assert "exited with status 3" in rows[("dense", 32)]["message"]
    assert rows[("dense", 64)]["message"].startswith("timeout")
    assert rows[("xla", 16)]["status"] == "oom" and not rows[("xla", 16)].get("skipped")
    for t in (32, 64):
        assert rows[("xla", t)]["status"] == "oom" and rows[("xla", t)]["skipped"]
        assert "shorter length 16" in rows[("xla", t)]["message"]


def test_points_share_one_worker_process(tmp_path):
    """Points on one device count run in one worker, a method's points together."""
    sweep = _sweep(TINY, tmp_path, methods=["dense", "blockwise"], passes=["fwd"], seq_lens=[8, 16])
    command = (
        sys.executable,
        "-c",
        _FAKE_WORKER.replace("== 64", "== -1").replace("== 32", "== -1"),
    )
    outcome = runner.run_sweep(sweep, tmp_path / "out", stream=None, command=command)
    rows = runner.read_rows(outcome.path)
    assert [r["method"] for r in rows] == ["dense", "dense", "blockwise", "blockwise"]
    assert len({r["worker_pid"] for r in rows}) == 1
    assert [pool_mod.group_of(p) for p in ({"devices": None}, {"devices": 4})] == [1, 4]


def test_real_worker_serves_points_with_their_own_peak_memory(tmp_path):
    """``worker --serve``: one row line per point; the second, smaller point's host peak is its
    own (the peak is reset between points), not the first's."""
    big = spec.Point("dense", {}, 512, 2, 4, 4, 64, "float32", True, "fwd+bwd")
    small = spec.Point("dense", {}, 8, 1, 2, 2, 4, "float32", True, "fwd")
    extra = {"repeats": 1, "warmup": 1, "reference_max_elements": 0}
    with pool_mod.WorkerPool(120) as pool:
        first = pool.execute({**big.identity(), **extra})
        pid = pool.proc.pid
        second = pool.execute({**small.identity(), **extra})
        assert pool.proc.pid == pid  # the same process measured both
    assert first["status"] == second["status"] == "ok", (first["message"], second["message"])
    assert second["host_peak_rss_bytes"] < first["host_peak_rss_bytes"]
    assert 0 <= second["host_rss_increase_bytes"] < first["host_rss_increase_bytes"]


def test_append_never_glues_a_row_onto_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a", "status": "ok"}\n{"key": "b", "sta')
    runner.append_row(path, {"key": "c", "status": "ok"})
    runner.append_row(path, {"key": "d", "status": "ok"})
    assert [r["key"] for r in runner.read_rows(path)] == ["a", "c", "d"]
    assert path.read_text().endswith('"ok"}\n')


def test_shards_partition_the_points(tmp_path):
    sweep = _sweep(
        TINY, tmp_path, methods=["dense", "xla", "blockwise"], seq_lens=[8, 16, 32], passes=PASSES
    )
    keys = [p.key for p in sweep.points]
    assert len(keys) == len(set(keys)) == 3 * 3 * 2
    for count in (1, 2, 3, 5):
        shards = [[p.key for p in sweep.shard(i, count)] for i in range(count)]
        assert sorted(k for shard in shards for k in shard) == sorted(keys)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert spec.parse_shard("2/5") == (2, 5)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--methods", "dense,nope"], "registered methods: dense"),
        (["--seq-lens", "1024,0"], "seq_lens=0 must be an int >= 1"),
        (["--shard", "2/2"], "0 <= I < N"),
        (["--shard", "two"], "expected I/N"),
        (["no_such_preset"], "default"),
        (["--dtype", "float8"], "float32, bfloat16, float16"),
        (["--passes", "bwd"], "fwd, fwd+bwd"),
        (["--kv-heads", "3"], "valid kv_heads: [1, 2, 4]"),
        (["--option", "dense.window=3"], "its options: none"),
        (["--option", "performer"], "METHOD.NAME=VALUE"),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(x),
)
def test_bad_arguments_exit_nonzero_listing_valid_values(tmp_path, capsys, args, expected):
    assert cli.main(["sweep", *args, "--out", str(tmp_path), "--dry-run"]) != 0
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def test_presets_parse_and_default_covers_every_method(capsys):
    presets = spec.available_presets()
    for name in ("default", "seq_scaling", "head_dim", "kv_heads", "dtype", "approx_error"):
        sweep = spec.build_sweep(name, spec.load_preset(str(presets[name]))[1], {}, ea.methods())
        assert sweep.points, name
    assert cli.main(["sweep", "--dry-run"]) == 0
    keys = capsys.readouterr().out.split()
    assert {k.split("|")[0] for k in keys} == set(ea.methods())
    assert {k.split("|")[-2] for k in keys} == {"fwd", "fwd+bwd"}


def _synthetic_rows(lengths=(256, 1024, 4096)) -> list[dict]:
    rows = []
    for method, time_at, mem_at in (
        ("dense", lambda t: 1e-3 * t**2, lambda t: 8.0 * t**2),
        ("local", lambda t: 0.1 * t, lambda t: 4096.0 * t),
    ):
        for t in lengths:
            p = spec.Point(method, {}, t, 1, 4, 4, 64, "float32", True, "fwd")
            row = worker.base_row(p.identity(), "ok")
            row.update(time_ms=time_at(t), time_ms_min=time_at(t), time_ms_max=time_at(t))
            row.update(memory_bytes=mem_at(t), rel_error=1e-7 if method == "dense" else 0.1)
            rows.append(row)
    oom = worker.base_row(
        spec.Point("dense", {}, 16384, 1, 4, 4, 64, "float32", True, "fwd").identity(), "oom"
    )
    return [*rows, {**oom, "message": "RESOURCE_EXHAUSTED"}]


def test_exponents_and_crossovers_on_synthetic_rows():
    (data,) = report.group(_synthetic_rows())
    assert report.fit_exponent(data.values("dense", report.time_ms)) == pytest.approx(2.0)
    assert report.fit_exponent(data.values("local", report.memory_mib)) == pytest.approx(1.0)
    assert data.values("dense", report.time_ms)[16384] == math.inf
    # 1e-3 t^2 = 0.1 t at t = 100 < 256; 8 t^2 = 4096 t at t = 512
    cross = report.crossover_table(data)[1][0]
    assert cross[:3] == ["local", "≤ 256", "≈ 512"]


def test_report_writes_md_tex_plots_and_merges_files(tmp_path, capsys):
    rows = _synthetic_rows()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for row in rows[:4]:
        runner.append_row(a / "results.jsonl", row)
    for row in rows[3:]:
        runner.append_row(b / "results.shard-1-of-2.jsonl", row)
    runner.append_row(b / "results.shard-1-of-2.jsonl", {**rows[0], "time_ms": 99.0})
    merged = runner.merge_rows([a, b])
    assert len(merged) == len(rows)
    assert next(r for r in merged if r["key"] == rows[0]["key"])["time_ms"] == 99.0

    out = tmp_path / "report"
    assert cli.main(["report", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| dense |" in md and "| local |" in md and "OOM" in md and "Crossover" in md
    tex = (out / "report.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "OOM" in tex
    for stem in ("time", "memory", "error"):
        assert (out / f"{stem}-fwd-float32-causal-b1-n4-k4-h64.png").stat().st_size > 0
        assert (out / f"{stem}-fwd-float32-causal-b1-n4-k4-h64.pdf").stat().st_size > 0
    assert cli.main(["report", str(tmp_path / "missing")]) != 0
    assert "no results" in capsys.readouterr().err


def test_report_without_matplotlib_still_writes_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficient_attn.sweep.plots", None)  # import fails
    monkeypatch.delattr(efficient_attn.sweep, "plots", raising=False)
    for row in _synthetic_rows():
        runner.append_row(tmp_path / "results.jsonl", row)
    written = report.write_report([tmp_path])
    assert not [p for p in written if p.suffix in (".png", ".pdf")]
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert "\\toprule" in (tmp_path / "report.tex").read_text()


# ----------------------------------------------------------------------------- sequence parallel


def test_sequence_parallel_axes_keep_old_keys_and_validate(tmp_path):
    old = spec.Point("dense", {}, 16, 1, 2, 2, 8, "float32", True, "fwd")
    assert old.key == "dense|{}|L16|B1|N2|K2|H8|float32|causal|fwd|seed0"  # resume of old rows
    legacy = {k: v for k, v in old.identity().items() if k not in ("devices", "strategy")}
    assert spec.Point.from_identity(legacy) == old
    sp = dataclasses.replace(old, devices=4, strategy="ring")
    assert sp.key == old.key + "|P4|sp=ring" and spec.Point.from_identity(sp.identity()) == sp
    assert "ring P=4" in sp.label

    text = TINY.replace('[[grid]]\n[[grid]]\nmethods = ["no_such_method"]\n', "")
    sweep = _sweep(text + 'strategy = ["none", "ring", "all_to_all"]\n', tmp_path, devices=[1, 2])
    assert {(p.strategy, p.devices) for p in sweep.points} == {
        (None, 1),
        ("ring", 1),
        ("ring", 2),
        ("all_to_all", 1),
        ("all_to_all", 2),
    }  # one-device attention ("none") only at devices=1
    with pytest.raises(spec.SpecError, match="needs a sequence-parallel strategy"):
        _sweep(text, tmp_path, devices=[2])
    with pytest.raises(spec.SpecError, match="valid values: none, ring, all_to_all"):
        _sweep(text + 'strategy = "zigzag"\n', tmp_path)

    from efficient_attn.parallel.api import STRATEGIES

    assert set(spec.STRATEGIES) == set(STRATEGIES)
    name, data = spec.load_preset("sequence_parallel")
    preset = spec.build_sweep(name, data, {}, ea.methods())
    assert "share" in preset.note and preset.time_max_elements > 0
    assert {(p.strategy, p.devices, p.heads) for p in preset.points} == {
        (s, d, 4 if s == "ring" else 8) for s in spec.STRATEGIES for d in (1, 2, 4, 8)
    }
    env = worker.device_env(4, {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=4"
    assert worker.device_env(1, {"XLA_FLAGS": "--a=1"}) == {"XLA_FLAGS": "--a=1"}


def test_compile_only_points_record_memory_without_time():
    point = spec.Point("dense", {}, 16, 1, 2, 2, 8, "float32", True, "fwd")
    payload = {**point.identity(), "repeats": 1, "warmup": 1, "reference_max_elements": 10**6}
    row = worker.run_point({**payload, "time_max_elements": 100})
    assert row["status"] == "ok" and row["memory_bytes"] > 0 and row["compile_s"] > 0
    assert row["time_ms"] is None and row["rel_error"] is None
    assert "time_max_elements" in row["time_note"]
    assert "compiled only" in runner.row_summary(row)


def test_sequence_parallel_points_on_two_host_devices(tmp_path):
    """Fresh workers started with 2 host devices: ring is exact; all_to_all needs K % P == 0."""
    text = """
note = "host devices share the cores"
methods = ["blockwise"]
heads = 2
kv_heads = 1
head_dim = 8
repeats = 2
timeout_s = 120
passes = ["fwd+bwd"]
seq_lens = [31]
devices = 2
strategy = ["ring", "all_to_all"]
"""
    sweep = _sweep(text, tmp_path)
    out = tmp_path / "out"
    runner.run_sweep(sweep, out, stream=None)
    rows = {r["strategy"]: r for r in runner.read_rows(out / runner.RESULTS)}
    ring = rows["ring"]
    assert ring["status"] == "ok", ring["message"]
    assert ring["devices"] == 2 and ring["env"]["device_count"] == 2
    assert ring["rel_error"] < 1e-5 and ring["grad_rel_error"] < 1e-5
    assert ring["memory_bytes"] > 0 and ring["time_ms"] > 0
    a2a = rows["all_to_all"]
    assert a2a["status"] == "unsupported" and "divisible" in a2a["message"]
    report.write_report([out])
    text = (out / "report.md").read_text()
    assert "host devices share the cores" in text and "sequence parallel: ring" in text
    assert "blockwise ring P=2" in text and "Compiled memory per device" in text


def test_mods_are_a_sweep_axis(tmp_path):
    """flex.toml expands over mods; a point records block density, FLOPs and build time,
    and its error is against the float64 reference with the same mods."""
    name, data = spec.load_preset("flex")
    sweep = spec.build_sweep(name, data, {}, ea.methods())
    assert {p.mods for p in sweep.points} >= {"causal", "window:256", "documents:16", "alibi"}
    assert len({p.key for p in sweep.points}) == len(sweep.points)
    with pytest.raises(spec.SpecError, match="unknown mods variant"):
        _sweep('methods = ["dense"]\nseq_lens = [16]\nmods = ["spiral"]\n', tmp_path)
    for method in ("blockwise", "dense"):
        point = spec.Point(method, {}, 48, 1, 2, 2, 8, "float32", False, "fwd+bwd",
                           mods="documents:3")  # fmt: skip
        payload = {**point.identity(), "repeats": 1, "warmup": 1, "reference_max_elements": 10**6}
        row = worker.run_point(payload)
        assert row["status"] == "ok" and row["mods"] == "documents:3", row["message"]
        assert row["rel_error"] < 1e-5 and row["grad_rel_error"] < 1e-5
        if method == "blockwise":
            assert 0 < row["block_density"] <= 1 and row["block_mask_build_ms"] > 0
            assert row["executed_flops_fwd"] >= row["useful_flops_fwd"] > 0
    row = worker.run_point({**payload, "method": "linear_elu", "pass": "fwd"})
    assert row["status"] == "unsupported" and "mask_mod" in row["message"]
