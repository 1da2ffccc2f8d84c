"""ListOps (LRA's generator, Tay et al. 2020) and the classifier that learns it."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from efficient_attn.tasks import ListOps, make_task
from efficient_attn.tasks.listops import OPERATORS


def evaluate(text: str, max_args: int) -> int:
    """An independent evaluator of LRA's bracket notation; checks operators and arities."""
    stack: list[list] = []
    result = None
    for token in text.split():
        if token.startswith("["):
            assert token in OPERATORS, token
            stack.append([token])
        elif token == "]":
            op, *args = stack.pop()
            assert 2 <= len(args) <= max_args, (op, args)
            value = {
                "[MIN": min,
                "[MAX": max,
                "[MED": lambda a: int(np.median(a)),
                "[SM": lambda a: sum(a) % 10,
            }[op](args)
            if stack:
                stack[-1].append(value)
            else:
                result = value
        else:
            digit = int(token)
            assert 0 <= digit <= 9
            if stack:
                stack[-1].append(digit)
            else:
                result = digit
    assert not stack and result is not None, text
    return result


def test_inputs_evaluate_to_labels_within_bounds_and_padded():
    task = make_task("listops", max_depth=5, max_args=6, min_length=20, max_length=96)
    batch = task.batch(3, 7, 128)
    assert batch.inputs.shape == (128, 96) and batch.labels.shape == (128,)
    assert batch.inputs.dtype == np.int32 and batch.mask.all()
    for ids, label, length in zip(batch.inputs, batch.labels, batch.lengths, strict=True):
        assert 20 < length < 96
        assert (ids[:length] != 0).all() and (ids[length:] == 0).all()
        text = task.decode(ids)
        assert len(text.split()) == length
        assert evaluate(text, 6) == label
    assert set(np.unique(batch.labels)) == set(range(10))  # every class occurs


def test_batches_are_a_pure_function_of_seed_and_step():
    task = ListOps(max_depth=4, min_length=8, max_length=64)
    a, b = task.batch(0, 5, 16), task.batch(0, 5, 16)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (task.batch(0, 6, 16).inputs == a.inputs).all()
    assert not (task.batch(1, 5, 16).inputs == a.inputs).all()


def test_lra_setting_and_vocabulary():
    task = make_task("listops")
    assert (task.max_depth, task.max_args, task.min_length, task.max_length) == (10, 10, 500, 2000)
    assert task.vocab[0] == "<pad>" and task.vocab[1:11] == tuple(str(d) for d in range(10))
    assert set(task.vocab[11:]) == {"[MIN", "[MAX", "[MED", "[SM", "]"}
    assert task.vocab_size == len(task.vocab) == 16


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_len": 10}, "has no setting(s) ['max_len']"),
        ({"min_length": 100, "max_length": 100}, "min_length < max_length"),
        ({"min_length": 300, "max_length": 200}, "min_length < max_length"),
        ({"max_depth": 1, "min_length": 3, "max_length": 50}, "never have"),
        ({"max_depth": 2, "max_args": 3, "min_length": 5, "max_length": 20}, "never have"),
        ({"max_args": 1}, "max_args=1 must be >= 2"),
    ],
)
def test_bad_settings_are_value_errors(kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        make_task("listops", **kwargs)


def test_reachable_but_too_rare_lengths_raise_instead_of_looping():
    task = ListOps(max_depth=3, max_args=10, min_length=100, max_length=112)  # reachable, rare
    assert any(100 < t < 112 for t in task.lengths())
    with pytest.raises(ValueError, match="too rare"):
        task.batch(0, 0, 4)


def test_train_cli_listops_classifier_records_throughput(tmp_path):
    from efficient_attn.cli import main

    out = tmp_path / "run"
    argv = ["train", "--task", "listops", "--seq-len", "48", "--max-depth", "4"]
    argv += ["--min-length", "8", "--d-model", "16", "--steps", "6", "--batch-size", "8"]
    argv += ["--eval-every", "6", "--checkpoint-every", "6", "--pooling", "cls", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["accuracy_metric"] == "eval_accuracy" and 0.0 <= final["accuracy"] <= 1.0
    assert final["config"]["pooling"] == "cls" and final["config"]["min_length"] == 8
    # Steps run in blocks of steps_per_dispatch; the first block (compilation) is not timed.
    n = final["steps_per_dispatch"]
    assert 6 % n == 0 and final["timed_steps"] == 6 - n and final["tokens_per_s"] > 0
    assert final["flops_per_step"] > 0 and final["matmul_flop_s"] > 0
    assert final["flop_utilisation"] == pytest.approx(
        final["flops_per_step"] / (final["step_ms_median"] / 1e3) / final["matmul_flop_s"]
    )


def test_causal_recurrences_classify_causally_and_refuse_cls_pooling():
    """A causal_only method (no bidirectional form) trains as a causal classifier with
    mean pooling; padding is ignored; a class vector at position 0 is refused."""
    import jax
    import jax.numpy as jnp

    from efficient_attn.nn.model import Classifier, ModelConfig

    c = ModelConfig(num_classes=3, vocab_size=12, max_len=16, d_model=16, num_layers=1,
                    num_heads=2, method="retnet", pooling="mean")  # fmt: skip
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 1, 12)
    lengths = jnp.array([16, 9])
    model = Classifier(c)
    params = model.init(jax.random.key(1), tokens, lengths)
    logits = model.apply(params, tokens, lengths)
    assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all())
    # Padding after each length does not change the logits (keys past it are masked).
    noisy = tokens.at[1, 9:].set(5)
    assert jnp.allclose(model.apply(params, noisy, lengths)[1], logits[1], atol=1e-5)
    with pytest.raises(ValueError, match=r"causal recurrence.*pooling='mean'"):
        Classifier(dataclasses.replace(c, pooling="cls")).init(jax.random.key(1), tokens, lengths)
