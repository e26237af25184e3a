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


def test_defaults_match_the_documented_api():
    c = TrainingConfig()
    assert (c.learning_rate, c.batch_size, c.gradient_accumulation_steps, c.num_epochs) == (2e-5, 4, 4, 3)
    assert (c.warmup_steps, c.max_grad_norm, c.eval_steps, c.save_steps, c.logging_steps) == (100, 1.0, 100, 500, 10)
    assert (c.output_dir, c.fp16, c.gradient_checkpointing, c.ddp, c.local_rank, c.world_size) == (
        "./outputs",
        True,
        True,
        False,
        -1,
        1,
    )
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
