"""Every shipped configs/<model>/<method>.yaml loads through `aift train`'s own config path and fits its name."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aift.cli.train import add_arguments, resolve
from aift.models.registry import get_spec

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*/*.yaml"))
METHOD_FILES = [p for p in CONFIGS if p.stem in ("full", "lora", "qlora")]


def test_each_model_has_full_lora_and_qlora():
    by_model: dict[str, set[str]] = {}
    for path in METHOD_FILES:
        by_model.setdefault(path.parent.name, set()).add(path.stem)
    assert len(by_model) >= 4
    assert all(methods == {"full", "lora", "qlora"} for methods in by_model.values()), by_model


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_example_config_is_valid(path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    configs = resolve(parser.parse_args([str(path), "dataset_path=some/prepared"]))
    training, lora = configs.training, configs.lora
    assert get_spec(training.model_name) is not None, f"{training.model_name} is not a registered model"
    if path.stem == "full":
        assert lora is None
    else:
        assert lora is not None and lora.use_qlora == (path.stem == "qlora")
    if get_spec(training.model_name).trust_remote_code:
        assert training.trust_remote_code, "this model needs trust_remote_code: true"
