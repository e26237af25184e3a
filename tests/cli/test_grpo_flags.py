"""GRPO's options reach GRPOConfig the same from flags, `grpo.key=value` and YAML; bad batch sizes are refused."""

from __future__ import annotations

import argparse

import pytest

from aift.cli import train as train_cli
from aift.errors import AiftError
from aift.training.grpo_trainer import check_batch_size, check_grpo_strategy


def _resolve(*argv: str):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.resolve(parser.parse_args(["dataset_path=d", *argv]))


def test_a_list_option_parses_the_same_from_a_flag_key_value_and_yaml(tmp_path):
    yaml_file = tmp_path / "grpo.yaml"
    yaml_file.write_text(
        "method: grpo\ngrpo:\n  rewards: [exact_match, 'format:^\\d{1,4}$']\n  reward_weights: [1, 0.2]\n",
        encoding="utf-8",
    )
    from_flags = _resolve("--method", "grpo", "--reward", "exact_match", "--reward", r"format:^\d{1,4}$",
                          "--reward-weights", "1,0.2")  # fmt: skip
    from_items = _resolve("method=grpo", "grpo.rewards=[exact_match, 'format:^\\d{1,4}$']", "grpo.reward_weights=1,0.2")
    from_yaml = _resolve(str(yaml_file))
    for configs in (from_flags, from_items, from_yaml):
        assert configs.method == "grpo" and configs.preference is None
        assert configs.grpo.rewards == ["exact_match", r"format:^\d{1,4}$"]
        assert configs.grpo.reward_weights == [1.0, 0.2]
        assert all(isinstance(w, float) for w in configs.grpo.reward_weights)


def test_a_shared_flag_goes_to_the_chosen_method():
    assert _resolve("--method", "grpo", "--reward", "ja", "--beta", "0.04").grpo.beta == 0.04
    assert _resolve("--method", "dpo", "--beta", "0.3").preference.beta == 0.3
    assert _resolve("--method", "grpo", "--reward", "ja", "--num-generations", "4").grpo.num_generations == 4
    with pytest.raises(AiftError, match="num_generations"):
        _resolve("--method", "dpo", "--num-generations", "4")  # a GRPO option for DPO


def test_batch_size_must_hold_whole_groups_and_sharding_strategies_are_refused():
    from aift.config import TrainingConfig

    check_batch_size(16, 8)
    with pytest.raises(AiftError, match="--batch-size 12 counts completions per process .* --num-generations 8"):
        check_batch_size(12, 8)
    for strategy in ("fsdp", "pipeline"):
        with pytest.raises(AiftError, match=f"strategy {strategy} cannot serve it"):
            check_grpo_strategy(TrainingConfig(strategy=strategy))
