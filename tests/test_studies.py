"""Studies run through ``efficient-attn sweep``: decode and scale_ablation on tiny settings."""

from __future__ import annotations

import json

import pytest

from efficient_attn import cli, studies
from efficient_attn.studies import decode, scale_ablation
from efficient_attn.sweep import runner, spec


def _rows(out) -> list[dict]:
    return runner.read_rows(out / "results.jsonl")


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_decode_cache_sizes_resume_and_report(tmp_path, capsys):
    out = tmp_path / "decode"
    args = ["sweep", "decode", "--seq-lens", "64,128", "--heads", "4", "--head-dim", "16"]
    args += ["--methods", "dense,linear_elu", "--repeats", "3", "--out", str(out)]
    assert cli.main(args) == 0
    rows = _rows(out)
    assert len(rows) == 8  # 2 methods x K in (4, 1) x 2 lengths
    for r in rows:
        assert r["experiment"] == "decode" and r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["repeats"] >= 1 and r["env"]["jax"]
        assert (r["batch"], r["heads"], r["head_dim"], r["dtype"]) == (1, 4, 16, "float32")
    cache = {(r["method"], r["kv_heads"], r["seq_len"]): r["cache_bytes"] for r in rows}
    assert cache[("dense", 4, 64)] == 2 * 64 * 4 * 16 * 4  # K and V, float32
    assert cache[("dense", 4, 128)] == 2 * cache[("dense", 4, 64)]  # grows linearly
    assert cache[("dense", 4, 128)] == 4 * cache[("dense", 1, 128)]  # MQA: N times smaller
    assert cache[("linear_elu", 4, 64)] == cache[("linear_elu", 4, 128)]  # constant state
    assert cache[("linear_elu", 4, 128)] < cache[("dense", 4, 128)]
    forms = {r["method"]: r["decode_form"] for r in rows}
    assert forms == {"dense": "kv cache", "linear_elu": "recurrent state"}
    assert {r["attention"] for r in rows} == {"MHA", "MQA"}
    report = (out / "report.md").read_text()
    assert "What it shows" in report and "MQA (K=1)" in report and "4x smaller" in report
    assert (out / "report.tex").read_text().count("\\begin{table}") == 3  # time, cache, temp
    assert (out / "decode-b1-n4-h16-float32.png").stat().st_size > 0
    assert (out / "decode-b1-n4-h16-float32.pdf").stat().st_size > 0
    capsys.readouterr()

    assert cli.main([*args, "--no-report"]) == 0  # resume: every row is already there
    assert "ran 0 points" in capsys.readouterr().out
    assert len(_rows(out)) == 8
    (out / "report.md").unlink()
    assert cli.main(["report", str(out)]) == 0  # the report command dispatches on experiment
    assert "## batch 1, 4 query heads" in (out / "report.md").read_text()


def test_decode_unsupported_rows_and_refused_flags(tmp_path, capsys):
    out = tmp_path / "decode"
    args = ["sweep", "decode", "--seq-lens", "32", "--heads", "2", "--head-dim", "8"]
    assert cli.main([*args, "--methods", "cudnn", "--kv-heads", "1", "--out", str(out)]) == 0
    (row,) = _rows(out)
    assert row["status"] == "unsupported" and "not available" in row["message"]
    assert row["time_ms"] is None and row["cache_bytes"] is None
    assert "n/a" in (out / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(["sweep", "--status", str(out)]) == 0  # a study directory's status
    text = capsys.readouterr().out
    assert "'decode', 1 point" in text and "done        1  (unsupported 1)" in text, text
    for flag, expected in (
        (["--passes", "fwd"], "--passes not used by study 'decode'"),
        (["--no-causal"], "--causal not used"),
        (["--kv-heads", "3"], "valid kv_heads: [1, 2]"),
        (["--methods", "nope"], "registered methods"),
    ):
        capsys.readouterr()
        assert cli.main(args + flag + ["--out", str(tmp_path / "x"), "--dry-run"]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_presets_are_listed_and_sweep_presets_unchanged(capsys):
    assert cli.main(["sweep", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("decode", "scale_ablation", "default", "kv_heads"):
        assert f"\n{name} " in "\n" + listed
    assert set(studies.available_presets()) >= {"decode", "scale_ablation"}
    assert not {"decode", "scale_ablation"} & set(spec.available_presets())
    assert cli.main(["sweep", "decode", "--dry-run"]) == 0
    keys = capsys.readouterr().out.split()
    assert len(keys) == 11 * 3 * 6 and len(set(keys)) == len(keys)  # methods x K x lengths
    assert cli.main(["sweep", "no_such_preset", "--dry-run"]) == 2
    assert "studies: " in capsys.readouterr().err


def test_attention_statistics_follow_the_scale():
    d = 256
    sqrt_rule = scale_ablation.attention_statistics(d, d**-0.5, seq_len=128, seeds=2)
    one = scale_ablation.attention_statistics(d, 1.0, seq_len=128, seeds=2)
    inv = scale_ablation.attention_statistics(d, 1.0 / d, seq_len=128, seeds=2)
    assert one["max_weight"] > 0.8 and one["entropy"] < 0.5  # saturated: nearly one-hot
    assert one["entropy"] < sqrt_rule["entropy"] < inv["entropy"] <= inv["entropy_uniform"]
    assert inv["entropy_uniform"] - inv["entropy"] < 0.01  # 1/d: nearly uniform
    assert 0.9 < sqrt_rule["logit_std"] < 1.1 and 15 < one["logit_std"] < 17
    assert inv["max_weight"] < sqrt_rule["max_weight"] < one["max_weight"]
    assert inv["grad_norm"] < sqrt_rule["grad_norm"]


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_scale_ablation_random_and_trained_rows(tmp_path, capsys):
    preset = tmp_path / "tiny.toml"
    preset.write_text(
        'study = "scale_ablation"\ndescription = "tiny"\nrules = ["1"]\n'
        "seeds = 2\ntrain_head_dim = [8]\n[train]\nseq_len = 12\nnum_pairs = 2\n"
        "num_layers = 1\nsteps = 2\nwarmup_steps = 1\nbatch_size = 4\nlog_every = 1\n"
        "eval_every = 1\neval_batches = 1\ncheckpoint_every = 2\n"
    )
    out = tmp_path / "scale"
    args = ["sweep", str(preset), "--head-dim", "8,32", "--seq-lens", "16", "--out", str(out)]
    assert cli.main(args) == 0
    rows = _rows(out)
    assert all(r["experiment"] == "scale_ablation" and r["status"] == "ok" for r in rows), rows
    random = {(r["scale_rule"], r["head_dim"]): r for r in rows if r["kind"] == "random"}
    trained = [r for r in rows if r["kind"] == "trained"]
    assert set(random) == {("1", 8), ("1", 32)}
    assert random[("1", 32)]["scale"] == 1.0 and random[("1", 32)]["logit_std"] > 5
    assert random[("1", 32)]["entropy"] < random[("1", 8)]["entropy"]  # saturates with d
    assert random[("1", 32)]["max_weight"] > random[("1", 8)]["max_weight"]
    for r in random.values():
        assert 0 < r["max_weight"] <= 1 and 0 < r["entropy"] <= r["entropy_uniform"]
        assert r["grad_norm"] > 0 and r["accuracy"] is None
    (r,) = trained
    assert r["scale_rule"] == "1" and r["head_dim"] == 8 and r["config"]["d_model"] == 16
    assert r["steps"] == 2 and 0 <= r["accuracy"] <= 1 and [s for s, _ in r["curve"]] == [1, 2]
    assert len(r["max_weight_layers"]) == 1 and 0 < r["max_weight"] <= 1
    assert r["grad_norm"] is None and r["entropy"] > 0
    assert (out / r["run_dir"] / "final.json").is_file()
    assert json.loads((out / r["run_dir"] / "config.json").read_text())["scale"] == 1.0
    report = (out / "report.md").read_text()
    assert "What it shows" in report and "held-out accuracy" in report
    for name in ("scale_ablation-random", "scale_ablation-trained"):
        assert (out / f"{name}.png").is_file() and (out / f"{name}.pdf").is_file()
    assert (out / "report.tex").read_text().count("\\begin{table}") == 2
    capsys.readouterr()
    assert cli.main([*args, "--no-report"]) == 0
    assert "ran 0 points" in capsys.readouterr().out
    assert cli.main([*args, "--repeats", "3", "--dry-run"]) == 2
    assert "--repeats not used by study 'scale_ablation'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rules": ["1/e"]}, "valid rules are 1/sqrt(d), 1, 1/d"),
        ({"train": {"scale": 0.5}}, "set by the study"),
        ({"bogus": 1}, "valid keys: study, description"),
    ],
)
def test_scale_ablation_settings_are_checked(tmp_path, data, expected):
    study = studies.STUDIES["scale_ablation"]
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        settings = studies.base.settings_of(study, "x", {"study": "scale_ablation", **data}, {})
        study.points(settings, tmp_path)


def test_kv_heads_auto():
    assert decode.kv_heads_for(8, "auto") == [8, 2, 1]
    assert decode.kv_heads_for(4, "auto") == [4, 1]
    assert decode.kv_heads_for(6, "auto") == [6, 1]
    assert [decode.attention_kind(8, k) for k in (8, 2, 1)] == ["MHA", "GQA", "MQA"]


@pytest.mark.parametrize("method", ["linear_elu", "performer"])
def test_recurrent_decode_step_equals_causal_attention(method):
    """Absorbing L - 1 tokens, then one step, gives the last row of causal attention."""
    import jax
    import numpy as np

    import efficient_attn as ea

    b, t, n, kh, h = 1, 24, 4, 2, 8
    options = ea.get_method(method).resolve_options({})
    state, inputs, step = decode._recurrent_step(method, options, b, t, n, kh, h, np.float32, 3)
    q, k_new, v_new = inputs[:3]  # then the step's per-token inputs (none for these methods)
    out, new_state = jax.jit(step)(state, *inputs)
    normal = decode._normals(3, np.float32)  # the same draws, in the same order
    ks, vs = (np.moveaxis(np.asarray(normal(t - 1, b, kh, h)), 0, 1) for _ in range(2))
    k = np.concatenate([ks, np.asarray(k_new)[:, None]], axis=1)  # [B, L, K, H]
    v = np.concatenate([vs, np.asarray(v_new)[:, None]], axis=1)
    queries = np.concatenate([np.zeros((b, t - 1, n, h), np.float32), np.asarray(q)[:, None]], 1)
    full = ea.attention(queries, k, v, method=method, causal=True, **options)
    np.testing.assert_allclose(out, full[:, -1], rtol=2e-5, atol=2e-5)
    assert sum(x.nbytes for x in jax.tree.leaves(new_state)) == sum(
        x.nbytes for x in jax.tree.leaves(state)
    )
