"""`aift.distributed.entry.train` picks the trainer from the configs alone: one choice for the CLI, web UI, Python."""

from __future__ import annotations

import pytest

from aift.config import TrainingConfig
from aift.distributed.entry import check_preference_strategy, needs_device_setup
from aift.errors import AiftError
from aift.training.objectives.pairs import PreferenceConfig


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("values", "multi_device"),
    [
        ({}, False),
        ({"strategy": "ddp"}, False),  # one process of plain DDP is the plain loop
        ({"strategy": "fsdp"}, True),
        ({"deepspeed": "zero2"}, True),
        ({"world_size": 2}, True),
    ],
)
def test_multi_device_setup_only_when_the_config_asks(no_launcher, values, multi_device):
    assert needs_device_setup(TrainingConfig(**values)) is multi_device


def test_under_a_launcher_every_run_gets_the_multi_device_setup(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert needs_device_setup(TrainingConfig())


@pytest.mark.parametrize("values", [{"strategy": "fsdp"}, {"deepspeed": "zero2"}])
def test_preference_tuning_refuses_sharded_strategies(values):
    with pytest.raises(AiftError, match="runs on one process or DDP"):
        check_preference_strategy(TrainingConfig(**values), PreferenceConfig(method="dpo"))
    check_preference_strategy(TrainingConfig(), PreferenceConfig(method="dpo"))
