"""AdvancedMultiGPUTrainer's strategies: DeepSpeed presets through Accelerate's plugin and DeepSpeed's own parser,
FSDP2 plugin, clear errors where a strategy cannot run here, and GPU runs (skipped without CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from optional_pieces import import_optional

from aift.config import ConfigError, LoRAConfig, MultiGPUTrainingConfig, TrainingConfig
from aift.distributed.trainer import (
    DEEPSPEED_PRESETS,
    PRESET_DIR,
    AdvancedMultiGPUTrainer,
    deepspeed_plugin,
    fsdp_plugin,
    load_deepspeed_config,
    resolve_deepspeed_config,
)
from aift.errors import AiftError, NotAvailableError

CONFIG = TrainingConfig(batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5)


@pytest.mark.parametrize("preset", DEEPSPEED_PRESETS)
def test_every_preset_resolves_and_passes_accelerates_plugin(preset):
    resolved = resolve_deepspeed_config(preset, CONFIG, world_size=2)
    assert "auto" not in json.dumps(resolved)
    assert resolved["train_batch_size"] == 2 * 4 * 2 and resolved["gradient_clipping"] == 0.5
    assert resolved["bf16"]["enabled"] is False and resolved["fp16"]["enabled"] is False  # the loop autocasts
    plugin = deepspeed_plugin(resolved)
    assert plugin.zero_stage == int(preset[4])
    assert plugin.hf_ds_config.is_offload() == preset.endswith("offload")


@pytest.mark.parametrize("preset", DEEPSPEED_PRESETS)
def test_every_preset_passes_deepspeeds_own_config_parser(preset):
    import_optional("deepspeed", "DeepSpeed is not installed (make test installs it)")
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(resolve_deepspeed_config(preset, CONFIG, world_size=1))
    assert parsed.zero_optimization_stage == int(preset[4])
    assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 4
    assert not parsed.float16_config.enabled and not parsed.bfloat16_config.enabled
    offloaded = parsed.zero_config.offload_optimizer is not None
    assert offloaded == preset.endswith("offload")
    if offloaded:
        assert parsed.zero_config.offload_optimizer.device == "cpu"


def test_preset_files_are_the_ones_shipped():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.json")) == sorted(DEEPSPEED_PRESETS)


def test_user_deepspeed_file_contradicting_the_config_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(AiftError, match="train_micro_batch_size_per_gpu=8 but aift's config gives 2"):
        resolve_deepspeed_config(str(path), CONFIG, world_size=1)


def test_bad_deepspeed_inputs_are_clear_errors(tmp_path):
    with pytest.raises(AiftError, match="neither a JSON file nor a preset"):
        load_deepspeed_config("zero4")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}')
    with pytest.raises(AiftError, match="invalid JSON at line 4"):
        load_deepspeed_config(str(bad))
    no_zero = tmp_path / "nozero.json"
    no_zero.write_text("{}")
    with pytest.raises(AiftError, match="zero_optimization"):
        load_deepspeed_config(str(no_zero))


def test_fsdp2_plugin_full_shard_per_decoder_layer():
    plugin = fsdp_plugin(["LlamaDecoderLayer"], CONFIG)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert "SHARDED" in str(fsdp_plugin(["LlamaDecoderLayer"], CONFIG, sharded_state_dict=True).state_dict_type)


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="strategy must be one of"):
        MultiGPUTrainingConfig(strategy="tensor")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
@pytest.mark.parametrize(
    ("strategy", "reason"),
    [
        ("fsdp", "Accelerate enables FSDP only on GPU backends"),
        ("model_parallel", "no second device"),
    ],
)
def test_strategies_that_cannot_run_on_this_cpu_say_why(strategy, reason, tiny_model_dir, tmp_path):
    config = MultiGPUTrainingConfig(strategy=strategy, output_dir=str(tmp_path), max_steps=1)
    trainer = AdvancedMultiGPUTrainer(str(tiny_model_dir), config, lora_config=LoRAConfig(r=2))
    with pytest.raises(NotAvailableError, match=reason):
        trainer.train(train_texts=["こんにちは"])
    assert not any(tmp_path.iterdir()), "nothing is written before the error"


def test_world_size_in_the_config_must_match_the_launch(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = MultiGPUTrainingConfig(world_size=4, output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(AiftError, match="world_size=4 but 1 process"):
        AdvancedMultiGPUTrainer(str(tiny_model_dir), config).train(train_texts=["a"])


def test_training_config_without_a_strategy_is_ddp_or_deepspeed(tiny_model_dir):
    trainer = AdvancedMultiGPUTrainer(str(tiny_model_dir), TrainingConfig(batch_size=3))
    assert trainer.config.strategy == "ddp" and trainer.config.batch_size == 3
    ds = AdvancedMultiGPUTrainer(str(tiny_model_dir), TrainingConfig(deepspeed="zero3"))
    assert ds.config.strategy == "deepspeed"


# ---------------------------------------------------------------------- GPU only (skipped here)


def _gpu_train(tmp_path, tiny_model_dir, tiny_prepared, *extra):
    from dist_helpers import run_aift, train_args, train_losses

    out = tmp_path / "out"
    result = run_aift(["train", *train_args(tiny_model_dir, tiny_prepared, out), *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    return train_losses(out)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpu_strategies_train(strategy, tmp_path, tiny_model_dir, tiny_prepared):
    losses = _gpu_train(tmp_path, tiny_model_dir, tiny_prepared, "--nproc-per-node=2", f"--strategy={strategy}")
    assert losses[4] < losses[1]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_two_gpu_deepspeed_trains(preset, tmp_path, tiny_model_dir, tiny_prepared):
    import_optional("deepspeed", "DeepSpeed is not installed (make test installs it)")
    losses = _gpu_train(
        tmp_path, tiny_model_dir, tiny_prepared, "--nproc-per-node=2", "--strategy=deepspeed", f"--deepspeed={preset}"
    )
    assert losses[4] < losses[1]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_model_parallel_spreads_layers_over_two_gpus(tmp_path, tiny_model_dir, tiny_prepared):
    losses = _gpu_train(
        tmp_path, tiny_model_dir, tiny_prepared, "--strategy=model_parallel", "--max-memory-per-gpu={0: 30MB, 1: 2GB}"
    )
    assert losses[4] < losses[1]


def test_deepspeed_over_several_cpu_processes_says_why(monkeypatch, tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = MultiGPUTrainingConfig(strategy="deepspeed", output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(NotAvailableError, match="Accelerate reports one process"):
        AdvancedMultiGPUTrainer(str(tiny_model_dir), config).train(train_texts=["a"])


def test_deepspeed_outside_a_launcher_is_refused(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = MultiGPUTrainingConfig(strategy="deepspeed", output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(AiftError, match="runs under a launcher"):
        AdvancedMultiGPUTrainer(str(tiny_model_dir), config).train(train_texts=["a"])


@pytest.mark.parametrize("config", [{"world_size": 2}, {"strategy": "fsdp"}, {}])
def test_the_front_door_passes_trust_remote_code(monkeypatch, config):
    """The multi-GPU front door used to drop trust_remote_code; the model holder must receive it, on every path."""
    import aift.inference.japanese
    from aift.distributed.entry import train

    seen = {}

    class Stop(Exception):
        pass

    def holder(name, **kwargs):
        seen.update(kwargs, name=name)
        raise Stop

    monkeypatch.setattr(aift.inference.japanese, "JapaneseModel", holder)
    with pytest.raises(Stop):
        train(TrainingConfig(model_name="some/model", trust_remote_code=True, **config))
    assert seen["trust_remote_code"] is True and seen["name"] == "some/model"


def test_presets_ship_inside_the_package():
    """Preset paths resolve from an installed wheel: the JSONs are package data, not files of the checkout."""
    import tomllib

    import aift

    package = Path(aift.__file__).resolve().parent
    assert PRESET_DIR.resolve().is_relative_to(package)
    patterns = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.relative_to(package).as_posix() for pattern in patterns["aift"] for p in package.glob(pattern)}
    assert {f"distributed/deepspeed_presets/{name}.json" for name in DEEPSPEED_PRESETS} <= shipped
