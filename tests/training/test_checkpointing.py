"""gradient_checkpointing: auto decides from the memory plan; a bool is kept; `aift train` defaults to auto."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import pytest
import yaml

from aift.config import ConfigError, TrainingConfig
from aift.training import checkpointing
from aift.training.checkpointing import planned_bytes_without_checkpointing, resolve_gradient_checkpointing
from aift.training.configs import resolve_train_configs

MODEL = "smollm2-135m-instruct"  # only its config is read


@pytest.fixture
def ram_16gb(monkeypatch):
    """This machine as a 16 GB one, whatever it really has, so that the verdicts below do not depend on it."""
    monkeypatch.setattr(checkpointing, "machine_ram_bytes", lambda: 16e9)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def _decide(**config) -> bool:
    return resolve_gradient_checkpointing(
        TrainingConfig(**{"gradient_checkpointing": "auto", **config}), MODEL, method="lora", device_type="cpu"
    )


def test_auto_is_off_where_the_run_fits_and_on_where_it_does_not(ram_16gb, caplog):
    with caplog.at_level(logging.INFO, logger="aift.training.checkpointing"):
        assert _decide(batch_size=4, max_length=512) is False  # a few GB: recomputing would only cost time
        assert _decide(batch_size=64, max_length=4096) is True  # hundreds of GB of activations without it
    decisions = [r.getMessage() for r in caplog.records]
    assert decisions[0].startswith("gradient checkpointing: auto -> off (without it the plan needs")
    assert "RAM: 16.0 GB" in decisions[0]
    assert decisions[1].startswith("gradient checkpointing: auto -> on")


def test_the_decision_follows_the_plan_and_the_headroom(ram_16gb):
    config = TrainingConfig(gradient_checkpointing="auto", batch_size=8, max_length=1024)
    needed = planned_bytes_without_checkpointing(
        config, MODEL, method="lora", device_type="cpu", lora_r=16, lora_dropout=0.0, rows_per_example=1,
        trust_remote_code=False,
    )  # fmt: skip
    # checkpointing in some form (selective or full) exactly where the run does not fit without it
    assert (_decide(batch_size=8, max_length=1024) is not False) is (needed > checkpointing.HEADROOM * 16e9)
    pair = planned_bytes_without_checkpointing(
        config, MODEL, method="lora", device_type="cpu", lora_r=16, lora_dropout=0.0, rows_per_example=2,
        trust_remote_code=False,
    )  # fmt: skip
    assert pair > needed  # chosen and rejected both hold activations


def test_the_plan_adapts_only_the_target_modules(ram_16gb):
    config = TrainingConfig(gradient_checkpointing="auto", batch_size=8, max_length=1024)

    def needed(targets):
        return planned_bytes_without_checkpointing(
            config, MODEL, method="lora", device_type="cpu", lora_r=16, lora_dropout=0.05, rows_per_example=1,
            trust_remote_code=False, lora_targets=targets,
        )  # fmt: skip

    assert needed(["q_proj", "v_proj"]) < needed(None) == needed("all-linear")


def test_a_trainer_asks_auto_about_its_own_target_modules(ram_16gb, monkeypatch):
    from aift.config import LoRAConfig
    from aift.training import trainers

    asked = {}

    def record(config, model, **kwargs):
        asked.update(kwargs)
        return False

    monkeypatch.setattr(trainers, "resolve_gradient_checkpointing", record)
    lora = LoRAConfig(r=8, target_modules="q_proj,v_proj", lora_dropout=0.1)
    trainers.LoRAFinetuningTrainer(MODEL, lora, TrainingConfig(gradient_checkpointing="auto"))._gradient_checkpointing()
    assert asked["lora_targets"] == ["q_proj", "v_proj"]
    assert asked["lora_r"] == 8 and asked["lora_dropout"] == 0.1 and asked["method"] == "lora"


def test_processes_of_a_node_share_its_ram(ram_16gb, monkeypatch):
    assert checkpointing.memory_budget("cpu") == (16e9, "RAM")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert checkpointing.memory_budget("cpu") == (4e9, "RAM / 4 processes of this node")


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_never_second_guessed(value, ram_16gb):
    huge = TrainingConfig(gradient_checkpointing=value, batch_size=256, max_length=8192)
    assert resolve_gradient_checkpointing(huge, MODEL, method="full", device_type="cpu") is value


def test_auto_is_on_for_strategies_that_split_the_model(ram_16gb):
    config = TrainingConfig(gradient_checkpointing="auto", strategy="fsdp", batch_size=1, max_length=64)
    assert resolve_gradient_checkpointing(config, MODEL, method="lora", device_type="cpu") is True


def test_auto_is_a_word_of_yaml_key_value_and_the_python_api(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gradient_checkpointing: auto\n")
    assert resolve_train_configs(path).training.gradient_checkpointing == "auto"
    assert resolve_train_configs(None, ["gradient_checkpointing=AUTO"]).training.gradient_checkpointing == "auto"
    assert resolve_train_configs(None, ["gradient_checkpointing=off"]).training.gradient_checkpointing is False
    path.write_text("gradient_checkpointing: selective\n")
    assert resolve_train_configs(path).training.gradient_checkpointing == "selective"
    assert (
        resolve_train_configs(None, ["gradient_checkpointing=Selective"]).training.gradient_checkpointing == "selective"
    )
    assert TrainingConfig().gradient_checkpointing is True  # the documented Python default stays
    with pytest.raises(
        ConfigError, match="gradient_checkpointing must be true, false, auto or selective; got 'sometimes'"
    ):
        resolve_train_configs(None, ["gradient_checkpointing=sometimes"])


def test_aift_train_defaults_to_auto_and_every_entry_point_overrides_it(tmp_path):
    from aift.cli.train import add_arguments, resolve

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("gradient_checkpointing: true\n")

    def resolved(*argv: str):
        return resolve(parser.parse_args(list(argv))).training.gradient_checkpointing

    assert resolved() == "auto"
    assert resolved(str(yaml_file)) is True
    assert resolved(str(yaml_file), "gradient_checkpointing=false") is False
    assert resolved("--gradient-checkpointing") is True
    assert resolved("--no-gradient-checkpointing", str(yaml_file)) is False
    assert resolved("--gradient-checkpointing", str(yaml_file), "gradient_checkpointing=false") is True  # flags win


def test_a_run_records_what_auto_decided(fp32_config, prepared_small, ram_16gb, caplog):
    from aift.training.trainers import LoRAFinetuningTrainer

    config = fp32_config(gradient_checkpointing="auto", max_steps=1, dataset_path=str(prepared_small))
    with caplog.at_level(logging.INFO, logger="aift.training.checkpointing"):
        trainer = LoRAFinetuningTrainer(config.model_name, None, config)
        trainer.train()
    assert any("gradient checkpointing: auto -> off" in r.getMessage() for r in caplog.records)
    assert trainer.config.gradient_checkpointing is False and config.gradient_checkpointing == "auto"
    saved = yaml.safe_load((trainer.result.output_dir / "config.yaml").read_text())
    assert saved["TrainingConfig"]["gradient_checkpointing"] is False  # the run folder says what ran


def _plan_bytes(config: TrainingConfig, selective_layers: int | None) -> float:
    """The plan's peak for this run: checkpointing off (None), or on with that many selective layers."""
    plan = checkpointing._Plan(config, MODEL, method="lora", device_type="cpu")
    return plan.bytes(False) if selective_layers is None else plan.bytes(True, selective_layers)


def test_selective_layers_cost_between_full_checkpointing_and_none():
    config = TrainingConfig(batch_size=16, max_length=2048)
    full, half, selective, off = (_plan_bytes(config, n) for n in (0, 15, 30, None))
    assert full < half < selective < off
    assert half - full == pytest.approx((selective - full) / 2)  # each selective layer costs the same


def test_auto_is_selective_where_only_that_fits_and_the_plan_chooses_the_layers(monkeypatch, caplog):
    config = TrainingConfig(gradient_checkpointing="auto", batch_size=16, max_length=2048)
    full, selective, off = (_plan_bytes(config, n) for n in (0, 30, None))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def with_ram(usable: float) -> tuple:
        monkeypatch.setattr(checkpointing, "machine_ram_bytes", lambda: usable / checkpointing.HEADROOM)
        mode = resolve_gradient_checkpointing(config, MODEL, method="lora", device_type="cpu")
        layers = checkpointing.selective_layer_count(
            dataclasses.replace(config, gradient_checkpointing="selective"), MODEL, n_layers=30, method="lora",
            device_type="cpu",
        )  # fmt: skip
        return mode, layers

    with caplog.at_level(logging.INFO, logger="aift.training.checkpointing"):
        assert with_ram(off * 1.01) == (False, 30)
        assert with_ram((selective + off) / 2) == ("selective", 30)
        assert with_ram((full + selective) / 2) == ("selective", 15)  # half the layers' GEMM outputs fit
        assert with_ram(full * 1.001) == (True, 0)
    assert any(r.getMessage().startswith("gradient checkpointing: auto -> selective") for r in caplog.records)
    assert any("15 of 30 layers keep their GEMM outputs" in r.getMessage() for r in caplog.records)


def test_selective_is_kept_and_fills_every_layer_where_memory_is_not_one_model_copy(ram_16gb):
    config = TrainingConfig(gradient_checkpointing="selective", strategy="fsdp", batch_size=64, max_length=4096)
    assert resolve_gradient_checkpointing(config, MODEL, method="lora", device_type="cpu") == "selective"
    assert checkpointing.selective_layer_count(config, MODEL, n_layers=30, method="lora", device_type="cpu") == 30
