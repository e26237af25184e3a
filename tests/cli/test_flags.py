"""Flags shared by `aift train`, `aift plan`, `aift bench` and `aift demo` come from one config field each."""

from __future__ import annotations

import argparse

import pytest

from aift.cli import build_parser
from aift.cli.flags import add_field_flag
from aift.config import LoRAConfig, TrainingConfig, field_help


def _action(command: str, flag: str) -> argparse.Action:
    return next(a for a in build_parser(command)._actions if flag in a.option_strings)


@pytest.mark.parametrize(
    ("command", "flag", "cls", "name"),
    [
        ("train", "--lora-r", LoRAConfig, "r"),
        ("train", "--learning-rate", TrainingConfig, "learning_rate"),
        ("plan", "--lora-r", LoRAConfig, "r"),
        ("plan", "--lora-dropout", LoRAConfig, "lora_dropout"),
        ("plan", "--lora-target-modules", LoRAConfig, "target_modules"),
    ],
)
def test_a_flag_is_documented_and_defaulted_by_its_field(command, flag, cls, name):
    action = _action(command, flag)
    assert action.help == field_help(cls)[name]
    expected = None if command == "train" else getattr(cls(), name)  # train: unset, so YAML and overrides count
    assert action.default == expected


def test_plan_reads_its_lora_rank_from_the_config():
    args = build_parser("plan").parse_args([])
    assert args.lora_r == LoRAConfig().r and args.lora_dropout == LoRAConfig().lora_dropout
    assert build_parser("plan").parse_args(["--lora-r", "8"]).lora_r == 8  # typed like the field


@pytest.mark.parametrize(
    ("command", "flag", "name", "default", "reason"),
    [
        ("demo", "--learning-rate", "learning_rate", 3e-3, "the demo has minutes"),
        ("demo", "--max-length", "max_length", 384, "short Q&A rows"),
        ("plan", "--max-length", "max_length", 2048, "long rows of GPU runs"),
        ("bench", "--learning-rate", "learning_rate", 2e-4, "the committed result's"),
    ],
)
def test_a_deliberate_difference_is_stated_in_help(command, flag, name, default, reason):
    action = _action(command, flag)
    config_default = getattr(TrainingConfig(), name)
    assert action.default == default != config_default
    assert action.help.startswith(field_help(TrainingConfig)[name])
    assert f"Default here {default}, not TrainingConfig's {config_default}: " in action.help
    assert reason in action.help
    given = build_parser(command).parse_args([flag, "5"])
    assert isinstance(getattr(given, name), type(default))


def test_a_different_default_needs_its_reason_and_only_then():
    parser = argparse.ArgumentParser()
    with pytest.raises(ValueError, match="needs its reason"):
        add_field_flag(parser, TrainingConfig, "learning_rate", default=1e-3)
    with pytest.raises(ValueError, match="needs its reason"):
        add_field_flag(parser, TrainingConfig, "learning_rate", default=2e-5, differs_because="the same value")
    with pytest.raises(ValueError, match="needs its reason"):
        add_field_flag(parser, TrainingConfig, "learning_rate", differs_because="no difference to explain")
