import pytest

from aift.config import (
    ConfigError,
    LoRAConfig,
    MultiGPUTrainingConfig,
    TrainingConfig,
    field_help,
    from_dict,
    load_yaml,
    parse_overrides,
)
from aift.training.configs import resolve_train_configs


def test_defaults_match_the_documented_api():
    c = TrainingConfig()
    assert (c.learning_rate, c.batch_size, c.gradient_accumulation_steps, c.num_epochs) == (2e-5, 4, 4, 3)
    # Warmup is a ratio of the run (#26.5: a fixed 100 steps left short runs below their learning rate).
    assert (c.warmup_steps, c.warmup_ratio, c.optimizer, c.lr_scheduler) == (None, 0.03, "adamw", "linear")
    assert (c.max_grad_norm, c.eval_steps, c.save_steps, c.logging_steps) == (1.0, 100, 500, 10)
    assert (c.output_dir, c.fp16, c.gradient_checkpointing, c.world_size) == ("./outputs", True, True, 1)
    lc = LoRAConfig()
    assert (lc.r, lc.lora_alpha, lc.target_modules, lc.lora_dropout, lc.bias, lc.task_type) == (
        16,
        32,
        None,
        0.05,
        "none",
        "CAUSAL_LM",
    )
    assert (lc.use_qlora, lc.qlora_4bit) == (False, True)
    assert MultiGPUTrainingConfig().strategy == "ddp"
    assert TrainingConfig(deepspeed="zero2").strategy == "deepspeed"  # a DeepSpeed config alone means deepspeed
    assert TrainingConfig(deepspeed="zero2", strategy="ddp").strategy == "ddp"  # an explicit strategy wins


def test_every_field_is_documented():
    for cls in (TrainingConfig, LoRAConfig, MultiGPUTrainingConfig):
        assert all(field_help(cls).values()), cls


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (TrainingConfig, {"batch_size": 0}, "batch_size"),
        (TrainingConfig, {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        (TrainingConfig, {"learning_rate": -1.0}, "learning_rate"),
        (TrainingConfig, {"report_to": ["tensorbord"]}, "report_to"),
        (LoRAConfig, {"r": 0}, "r"),
        (LoRAConfig, {"lora_dropout": 1.5}, "lora_dropout"),
        (LoRAConfig, {"bias": "some"}, "bias"),
        (MultiGPUTrainingConfig, {"strategy": "zero"}, "strategy"),
    ],
)
def test_invalid_values_name_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        from_dict(TrainingConfig, {"learnig_rate": 1e-4})


def test_cli_overrides_are_typed():
    c = from_dict(
        TrainingConfig,
        parse_overrides(
            ["learning-rate=3e-4", "batch_size=8", "packing=false", "report_to=none", "save_total_limit=None"]
        ),
    )
    assert c.learning_rate == 3e-4 and c.batch_size == 8 and c.packing is False
    assert c.report_to == ["none"] and c.save_total_limit is None
    lc = from_dict(LoRAConfig, parse_overrides(["target_modules=q_proj,v_proj"]))
    assert lc.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="batch_size"):
        from_dict(TrainingConfig, {"batch_size": "eight"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["batch_size"])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("all-linear", "all-linear"),
        ("all", "all-linear"),
        (["all-linear"], "all-linear"),
        ("q_proj, v_proj", ["q_proj", "v_proj"]),
        (["q_proj"], ["q_proj"]),
    ],
)
def test_target_modules_all_linear_or_a_list(given, expected):
    assert from_dict(LoRAConfig, {"target_modules": given}).target_modules == expected


def test_target_modules_cannot_mix_all_linear_with_names():
    with pytest.raises(ConfigError, match="mixes all-linear with module names"):
        LoRAConfig(target_modules="all-linear,q_proj")


def test_yaml_loading_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 1.0e-4\nnum_epochs: 1\n")
    assert from_dict(TrainingConfig, load_yaml(good)).learning_rate == 1e-4


@pytest.mark.parametrize("key", ["ddp", "local_rank", "tensor_parallel_size"])
def test_removed_keys_say_what_to_do(key):
    with pytest.raises(ConfigError, match=f"key '{key}' was removed .*; delete it"):
        from_dict(TrainingConfig, {key: 1})


def test_one_config_shape_whatever_keys_are_given(tmp_path):
    """A strategy key selects the strategy, not another config class: every run resolves to TrainingConfig."""
    assert MultiGPUTrainingConfig is TrainingConfig
    plain = resolve_train_configs({"batch_size": 2})
    piped = resolve_train_configs({"batch_size": 2}, ["strategy=pipeline", "pipeline_parallel_size=2"])
    assert type(plain.training) is type(piped.training) is TrainingConfig
    assert (plain.training.strategy, piped.training.strategy, piped.training.pipeline_parallel_size) == (
        "ddp", "pipeline", 2
    )  # fmt: skip


def test_resolution_yaml_then_overrides_then_explicit_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nbatch_size: 3\nmethod: dpo\npreference: {beta: 0.3}\nlora: {r: 8}\n")
    configs = resolve_train_configs(
        path, ["batch_size=5", "lora.r=4", "preference.beta=0.5"], training={"batch_size": 6}, lora={"use_dora": True}
    )
    assert (configs.training.learning_rate, configs.training.batch_size) == (1e-4, 6)
    assert (configs.lora.r, configs.lora.use_dora) == (4, True)
    assert (configs.preference.method, configs.preference.beta) == ("dpo", 0.5)
    assert resolve_train_configs({"method": "dpo"}, method="sft").preference is None  # the explicit method wins
    assert resolve_train_configs({}).lora is None and resolve_train_configs({}, lora={}).lora is not None
    with pytest.raises(ConfigError, match="need --method"):
        resolve_train_configs({"preference": {"beta": 0.2}})
    with pytest.raises(ConfigError, match="'lora:' must be a mapping"):
        resolve_train_configs({"lora": 8})
