"""The optimizer and schedule options (#26.5) reach the library from a flag, a key=value and a YAML key alike."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aift.cli import main
from aift.cli.train import add_arguments, resolve
from aift.config import field_help

REPO = Path(__file__).resolve().parents[2]

# option -> (flag value, key=value / YAML value, what the library holds)
OPTIONS = {
    "optimizer": ("muon", "sgd", "paged_adamw_8bit"),
    "lr_scheduler": ("cosine", "wsd", "cosine_with_min_lr"),
    "warmup_ratio": ("0.1", "0.2", 0.05),
    "warmup_steps": ("7", "9", 11),
    "min_lr_ratio": ("0.3", "0.2", 0.25),
    "wsd_decay_ratio": ("0.3", "0.4", 0.1),
    "neftune_noise_alpha": ("5", "10", 2.5),
}


def _resolve(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(list(argv))).training


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_reaches_the_config_from_a_flag_a_key_value_and_yaml(name, tmp_path):
    flag_value, item_value, yaml_value = OPTIONS[name]
    flag = "--" + name.replace("_", "-")
    config = tmp_path / "c.yaml"
    config.write_text(f"{name}: {yaml_value}\n")
    from_yaml = getattr(_resolve(str(config)), name)
    from_item = getattr(_resolve(str(config), f"{name}={item_value}"), name)
    from_flag = getattr(_resolve(str(config), f"{name}={item_value}", flag, flag_value), name)
    typed = type(yaml_value)
    assert (from_yaml, from_item, from_flag) == (yaml_value, typed(item_value), typed(flag_value))  # flags win


def test_the_flags_carry_the_fields_help():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    for name in OPTIONS:
        assert helps[name].replace("%%", "%") == field_help(type(_resolve()))[name] != ""  # argparse escapes %
    assert "--neftune-noise-alpha" in parser.format_help()  # argparse formats each help: a bare percent sign breaks it


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optimizer=adam", "optimizer must be one of adamw, adamw_8bit, paged_adamw_8bit, muon, schedule_free_adamw, sgd"),
        ("lr_scheduler=step", "lr_scheduler must be one of linear, cosine, cosine_with_min_lr, constant_with_warmup, wsd"),
        ("warmup_ratio=2", "warmup_ratio must be in [0, 1], got 2.0"),
    ],
)  # fmt: skip
def test_an_unknown_value_is_a_clear_error(item, message, tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path / 'out'}", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aift train: error: ") and message in err
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_the_docs_example_config_resolves():
    """examples/optimizers.yaml, which docs/optimizers.md trains with, holds what its comments say."""
    config = _resolve(str(REPO / "examples" / "optimizers.yaml"), "dataset_path=some/prepared")
    assert (config.optimizer, config.lr_scheduler, config.wsd_decay_ratio) == ("adamw_8bit", "wsd", 0.2)
    assert (config.warmup_steps, config.warmup_ratio, config.neftune_noise_alpha) == (None, 0.05, 5.0)
