"""The published-table presets (LRA, ListOps, Zoology) end to end at tiny sizes, and the
one experiment harness: a killed run resumes without repeating or losing a row."""

from __future__ import annotations

import json

import pytest

from efficient_attn import studies
from efficient_attn.studies import lra, worker, zoology
from efficient_attn.sweep import harness, results, runner

_TRAIN = {"num_layers": 1, "num_heads": 1, "batch_size": 4, "steps": 3, "warmup_steps": 1}
_TRAIN |= {"eval_every": 3, "eval_batches": 1, "checkpoint_every": 3, "log_every": 3}
TINY = {
    "lra_efficiency": {
        "methods": ["dense", "linear_elu"],
        "seq_lens": [32],
        "batch": 1,
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
        "mlp_ratio": 1,
        "repeats": 1,
    },
    "listops": {
        "methods": ["linear_elu"],
        "train": {**_TRAIN, "task": "listops", "max_depth": 3, "min_length": 4, "seq_len": 32},
    },
    "zoology_mqar": {
        "methods": ["dense"],
        "seq_pairs": [[16, 2]],
        "d_models": [8],
        "learning_rates": [0.01],
        "headline": [16, 2],
        "headline_seeds": [0, 1],
        "train": {**_TRAIN, "vocab_size": 16},
    },
}


@pytest.fixture
def in_process(monkeypatch):
    """Study points measured in this process (the worker's code, without a new process)."""
    monkeypatch.setattr(
        runner, "run_worker", lambda payload, timeout, command: worker.run_point(payload)
    )


@pytest.mark.parametrize(
    "preset",
    [
        pytest.param("lra_efficiency", marks=pytest.mark.slow),
        pytest.param("listops", marks=pytest.mark.slow),
        pytest.param("zoology_mqar", marks=pytest.mark.slow),
    ],
)
def test_preset_end_to_end_at_a_tiny_size(preset, tmp_path, in_process):
    name, data = studies.find_preset(preset)
    data = {**data, **TINY[preset]}
    out = tmp_path / preset
    outcome = studies.run(name, data, out, stream=None)
    rows = results.read_rows(out / "results.jsonl")
    assert outcome.ran == len(rows) > 0 and all(r["status"] == "ok" for r in rows), rows
    md = (out / "report.md").read_text()
    assert "What it shows" in md and "Source" in md
    if preset == "lra_efficiency":
        assert "| dense | Transformer | 1.00x / – |" in md  # ours / LRA's (LRA: 1K-4K only)
        assert "| linear_elu | Linear Trans. |" in md and "0.37 | 0.57 | 0.80 | 1.03" in md
        assert all(r["steps_per_s"] > 0 and r["memory_bytes"] > 0 for r in rows)
    elif preset == "listops":
        assert "| linear_elu | Linear Trans. |" in md and "| 16.13 |" in md
        assert rows[0]["tokens_per_s"] > 0 and rows[0]["flop_utilisation"] > 0
        assert 0.1 <= rows[0]["majority_accuracy"] <= 1 and "| majority label (baseline) |" in md
    else:
        assert (out / "zoology_mqar.png").stat().st_size > 0
        assert "## Sequence 16, 2 key-value pairs" in md and "| d_model 8 |" in md
        assert [(r["seq_len"], r["num_pairs"], r["seed"]) for r in rows] == [(16, 2, 0), (16, 2, 1)]
        assert "seeds [0, 1] (one value per seed, `a / b`)" in md
    assert studies.run(name, data, out, stream=None).ran == 0  # resumed: nothing left


@pytest.mark.parametrize("preset", ["lra_efficiency", "listops", "listops_lra", "zoology_mqar"])
def test_presets_name_registered_methods_and_unknown_ones_are_errors(preset, tmp_path):
    name, data = studies.find_preset(preset)
    study = studies.STUDIES[data["study"]]
    settings = studies.settings_of(study, name, data, {})
    assert study.points(settings, tmp_path)  # the shipped preset expands
    bad = studies.settings_of(study, name, {**data, "methods": ["dense", "nope"]}, {})
    with pytest.raises(
        ValueError, match=r"unknown method\(s\) \['nope'\]; registered methods: dense"
    ):
        study.points(bad, tmp_path)


def test_bad_listops_preset_settings_are_errors(tmp_path):
    name, data = studies.find_preset("listops")
    settings = studies.settings_of(lra.LISTOPS, name, data, {})
    for train, expected in (
        ({"min_length": 128}, "min_length < max_length"),
        ({"max_depth": 1, "min_length": 4}, "never have"),
        ({"num_pairz": 3}, "unknown; valid keys"),
        ({"task": "mqar"}, "task 'mqar' has no setting"),
    ):
        bad = {**settings, "train": {**settings["train"], **train}}
        with pytest.raises(ValueError, match=expected):
            lra.listops_points(bad, tmp_path)
    with pytest.raises(ValueError, match="seq_pairs entry"):
        zoology.points({**zoology.SETTINGS, "seq_pairs": [[64]]}, tmp_path)
    with pytest.raises(ValueError, match=r"headline=\[32, 2\] must be one of seq_pairs"):
        zoology.points({**zoology.SETTINGS, "headline": [32, 2]}, tmp_path)


def _trained_row(method, accuracy, status="ok", **fields):
    return {"method": method, "status": status, "accuracy": accuracy, **fields}


def test_zoology_cells_take_the_best_rate_per_seed_and_show_every_seed():
    cell = {"seq_len": 256, "num_pairs": 16, "d_model": 64}
    rows = [
        _trained_row("dense", 0.5, **cell, seed=0, learning_rate=1e-3),
        _trained_row("dense", 0.99, **cell, seed=0, learning_rate=1e-2),
        _trained_row("dense", 0.97, **cell, seed=1, learning_rate=1e-3),
        _trained_row("dense", None, "error", **cell, seed=1, learning_rate=1e-2),
        _trained_row("performer", None, "timeout", **cell, seed=0, learning_rate=1e-3),
    ]
    assert zoology.best_by_seed(rows)[(256, 16, "dense", 64)] == {0: 0.99, 1: 0.97}
    assert zoology.best_accuracy(rows)[(256, 16, "dense", 64)] == pytest.approx(0.98)
    assert zoology.best_accuracy(rows)[(256, 16, "performer", 64)] == "timeout"
    header, body = zoology.table(rows, 256, 16)
    assert header == ["method", "d_model 64"]
    assert body == [["dense", "0.990 / 0.970"], ["performer", "timeout"]]


def test_listops_report_prints_the_majority_baseline():
    rows = [
        _trained_row("dense", 0.40, majority_accuracy=0.17, tokens_per_s=1.0),
        _trained_row("linear_elu", 0.18, majority_accuracy=0.19, tokens_per_s=1.0),
    ]
    _, body = lra.listops_table(rows)
    assert body[-1] == ["majority label (baseline)", "–", "18.00", "–", "–", "–"]
    text = lra.listops_summary(rows)
    assert "the most frequent label scores 18.0%" in text
    assert "Dense attention is +22.0 points from that baseline" in text
    assert "1 of 2 runs score more than 5 points above it" in text


def test_a_killed_run_resumes_without_repeating_or_losing_a_row(tmp_path):
    """Killed (KeyboardInterrupt) in the middle of point 3, then a torn line, then resumed."""
    points = [{"key": f"p{i}", "label": f"point {i}", "seq_len": 16 * (i + 1)} for i in range(6)]
    calls: list[str] = []

    def execute(point, kill_at=None):
        calls.append(point["key"])
        if point["key"] == kill_at:
            raise KeyboardInterrupt
        return {"key": point["key"], "status": "ok", "seq_len": point["seq_len"], "value": 1}

    def new_row(point, status, message):
        return {"key": point["key"], "status": status, "message": message}

    killed = harness.Executor(lambda p: execute(p, "p3"), new_row, describe=lambda r: "")
    with pytest.raises(KeyboardInterrupt):
        harness.run_points(points, tmp_path, killed, name="test", stream=None)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"key": "p3", "sta')  # a row torn by the kill
    resumed = harness.Executor(execute, new_row, describe=lambda r: "")
    outcome = harness.run_points(points, tmp_path, resumed, name="test", stream=None)
    assert (outcome.ran, outcome.skipped) == (3, 3)
    assert calls == ["p0", "p1", "p2", "p3", "p3", "p4", "p5"]  # only the killed one again
    rows = results.read_rows(tmp_path / "results.jsonl")
    assert [r["key"] for r in rows] == [p["key"] for p in points]  # each once, none lost
    assert all(r["env"] for r in rows)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["key"] == "p5" and len(lines) == 7  # 6 rows + the torn line
