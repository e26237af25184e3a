"""max_eval_samples: the loop's evals (before the first step, on the cadence, after the last) on the first N
examples of the test split."""

from __future__ import annotations

import pytest
import torch

from aift.config import ConfigError, TrainingConfig, from_dict, parse_overrides
from aift.training.batching import Examples, first_examples
from aift.training.loop import run_training
from aift.training.run_files import RunInfo

TEXTS = [f"質問: {i} かける {i} は?\n回答: {i * i} です。" for i in range(6)]


def _rows(n: int) -> list[dict]:
    return [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(n)]


def test_the_first_n_examples_and_their_blocks_are_kept():
    examples = Examples(rows=_rows(5), name="evaluation", blocks=[[0, 1], [2, 3], [4]])
    first = first_examples(examples, 3)
    assert first.rows == _rows(3) and first.blocks == [[0, 1], [2]] and first.name == "evaluation"
    assert first_examples(examples, 0) is examples and first_examples(examples, 9) is examples
    assert first_examples(Examples(rows=_rows(4), name="e"), 2).blocks is None
    assert first_examples(Examples(rows=[], name="e"), 2) is None and first_examples(None, 2) is None


def test_max_eval_samples_is_a_checked_option_reached_by_key_value():
    assert TrainingConfig().max_eval_samples == 0
    assert from_dict(TrainingConfig, parse_overrides(["max_eval_samples=8"])).max_eval_samples == 8
    with pytest.raises(ConfigError, match="max_eval_samples must be >= 0"):
        TrainingConfig(max_eval_samples=-1)


def test_the_evals_of_a_run_use_only_the_first_examples(fp32_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    train = Examples(rows=[{"input_ids": x, "labels": x} for x in ids], name="training")

    def eval_losses(evaluation: Examples, name: str, **overrides) -> tuple[float, float]:
        config = fp32_config(max_steps=1, output_dir=str(fp32_config().output_dir) + name, **overrides)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        info = RunInfo(method="full", model_name=str(tiny_model_dir))
        summary = run_training(model, tokenizer, config, train, evaluation, info).summary
        return summary["initial_eval_loss"], summary["final_eval_loss"]

    limited = eval_losses(Examples(rows=train.rows, name="evaluation"), "-limited", max_eval_samples=2)
    first_two = eval_losses(Examples(rows=train.rows[:2], name="evaluation"), "-first-two")
    everything = eval_losses(Examples(rows=train.rows, name="evaluation"), "-all")
    assert limited == first_two
    assert limited[0] != pytest.approx(everything[0], rel=1e-4)
