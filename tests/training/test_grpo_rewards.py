"""GRPOConfig's defaults and checks, the built-in rewards' exact rules, the python: loader and the error messages."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from aift.config import ConfigError
from aift.training.grpo_config import GRPOConfig
from aift.training.rewards import (
    RewardError,
    exact_match,
    format_reward,
    japanese_share,
    length_penalty,
    load_reward,
    load_rewards,
    parse_reward_spec,
    score,
)

# ---------------------------------------------------------------------- config


def test_defaults_are_trl_1_16_grpo_config_defaults():
    from trl import GRPOConfig as TRLGRPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(TRLGRPOConfig)}
    ours = GRPOConfig()
    shared = [
        "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "scale_rewards", "loss_type",
        "epsilon", "epsilon_high", "delta", "importance_sampling_level", "num_iterations",
        "mask_truncated_completions", "beta", "use_bias_correction_kl", "disable_dropout", "reward_weights",
    ]  # fmt: skip
    assert {k: getattr(ours, k) for k in shared} == {k: trl_defaults[k] for k in shared}


def test_every_field_is_documented():
    assert all(f.metadata.get("help") for f in dataclasses.fields(GRPOConfig))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"scale_rewards": "std"}, "scale_rewards must be one of group, batch, none"),
        ({"loss_type": "cispo"}, "TRL loss aift does not implement"),
        ({"loss_type": "ppo"}, "loss_type must be one of grpo, dapo, dr_grpo, bnpo"),
        ({"importance_sampling_level": "seq"}, "importance_sampling_level must be one of token, sequence"),
        ({"epsilon": 1.0}, "epsilon must be in [0, 1)"),
        ({"delta": 1.1}, "delta must be > 1 + epsilon_high"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"num_iterations": 0}, "num_iterations must be >= 1"),
        ({"rewards": ["nope"]}, "unknown reward 'nope'"),
        ({"rewards": ["format:("]}, "does not compile"),
        ({"rewards": ["length:-3"]}, "positive number of characters"),
        ({"rewards": ["python:rewards.py"]}, "python:FILE.py:FUNCTION"),
        ({"rewards": ["exact_match", "ja"], "reward_weights": [1.0]}, "reward_weights has 1 value(s) but there are 2"),
        ({"reward_weights": "1,x"}, "numbers separated by commas"),
    ],
)
def test_config_checks(kwargs, message):
    with pytest.raises(ConfigError) as err:
        GRPOConfig(**kwargs)
    assert message in str(err.value)


def test_config_conversions_from_flags_and_yaml():
    config = GRPOConfig(rewards="exact_match", reward_weights="0.5", scale_rewards=False, epsilon_high=0.28)
    assert config.rewards == ["exact_match"]
    assert config.reward_weights == [0.5]
    assert GRPOConfig(rewards=["ja", "length"], reward_weights="1, 0.5").reward_weights == [1.0, 0.5]
    assert config.scale_rewards == "none"
    assert config.resolved_epsilon_high == 0.28
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(rewards=["ja", "length"]).resolved_reward_weights == [1.0, 1.0]
    assert GRPOConfig().resolved_epsilon_high == 0.2


# ---------------------------------------------------------------------- built-ins


def test_exact_match_normalises_nfkc_and_whitespace():
    completions = ["１２３", "  x   y \n", "x y z", "ａｂｃ", "anything"]
    reference = ["123", "x y", "x y", ["abd", "abc"], None]
    assert exact_match(None, completions, reference=reference) == [1.0, 1.0, 0.0, 1.0, None]


def test_exact_match_reads_conversational_completions():
    completions = [[{"role": "assistant", "content": " 東京 "}], [{"role": "assistant", "content": "大阪"}]]
    assert exact_match(None, completions, reference=["東京", "東京"]) == [1.0, 0.0]


def test_format_is_a_full_match_of_the_stripped_completion():
    f = format_reward(r"\d{4}-\d{2}-\d{2}")
    assert f(None, ["2024-01-02\n", "on 2024-01-02", "2024-01-023", " 2024-01-02 "]) == [1.0, 0.0, 0.0, 1.0]


def test_length_penalty_formula():
    f = length_penalty(10)
    texts = ["a" * 5, "a" * 10, "a" * 15, "a" * 20, "a" * 100]
    assert f(None, texts) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert load_reward("length").func(None, ["a" * 300])[0] == -0.5  # default target 200 characters


def test_japanese_share_counts_kana_kanji_and_japanese_punctuation():
    assert japanese_share(None, ["ひらがな", "カタカナｶﾀｶﾅ", "漢字。", "abcd", "東京 is", "", "  "]) == [
        1.0,
        1.0,
        1.0,
        0.0,
        2 / 4,
        0.0,
        0.0,
    ]


def test_spec_names_and_duplicates():
    names = [r.name for r in load_rewards(["exact_match", "format:^a$", "format:^b$", "ja", "length:5"])]
    assert names == ["exact_match", "format", "format_2", "ja", "length"]
    assert parse_reward_spec("python:C:\\dir\\r.py:fn") == ("python", "C:\\dir\\r.py:fn")
    with pytest.raises(ConfigError, match="at least one reward"):
        load_rewards([])


# ---------------------------------------------------------------------- python: loader


def test_python_reward_is_loaded_from_its_file(tmp_path):
    (tmp_path / "helper.py").write_text("BONUS = 0.5\n")
    (tmp_path / "my_rewards.py").write_text(
        "from helper import BONUS\n"
        "def my_reward(prompts, completions, reference, **kwargs):\n"
        "    return [BONUS + (c == r) for c, r in zip(completions, reference)]\n"
    )
    reward = load_reward(f"python:{tmp_path / 'my_rewards.py'}:my_reward")
    assert reward.name == "my_reward"
    table = score([reward], ["p", "p"], ["a", "b"], {"reference": ["a", "a"]}, step=1)
    assert table.tolist() == [[1.5], [0.5]]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (None, "does not exist"),
        ("def other(**kw):\n    return []\n", "has no function 'fn'; its functions: other"),
        ("fn = 3\n", "is a int, not a function"),
        ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError"),
    ],
)
def test_python_loader_errors(tmp_path, source, message):
    path = tmp_path / "r.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ConfigError) as err:
        load_reward(f"python:{path}:fn")
    assert message in str(err.value)


def test_trl_reward_functions_run_unchanged(tmp_path):
    """A TRL user's reward file (TRL's own rewards, conversational data, completion_ids) through aift's loader."""
    (tmp_path / "trl_rewards.py").write_text(
        "from trl.rewards import get_soft_overlong_punishment, think_format_reward\n"
        "overlong = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)\n"
    )
    path = tmp_path / "trl_rewards.py"
    rewards = [load_reward(f"python:{path}:think_format_reward"), load_reward(f"python:{path}:overlong")]
    completions = [
        [{"role": "assistant", "content": "<think>\nhm\n</think>\nyes"}],
        [{"role": "assistant", "content": "no"}],
    ]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    table = score(rewards, prompts, completions, {}, step=0, completion_ids=[[1] * 3, [1] * 8])
    assert table[:, 0].tolist() == [1.0, 0.0]
    assert table[:, 1].tolist() == [0.0, pytest.approx(-0.5)]  # 8 tokens: 2 into the 4-token cache of 10


# ---------------------------------------------------------------------- scoring and its errors


def _reward_from(tmp_path, body: str):
    (tmp_path / "bad.py").write_text(f"def bad(prompts, completions, **kwargs):\n{body}")
    return load_reward(f"python:{tmp_path / 'bad.py'}:bad")


def test_none_becomes_nan_and_kwargs_reach_the_function(tmp_path):
    reward = _reward_from(
        tmp_path,
        "    assert kwargs['trainer_state'].global_step == 7 and kwargs['completion_ids'] == [[1], [2]]\n"
        "    return [None, kwargs['reference'][1]]\n",
    )
    table = score([reward], ["p0", "p1"], ["a", "b"], {"reference": [1.0, 2.0]}, step=7, completion_ids=[[1], [2]])
    assert math.isnan(table[0, 0]) and table[1, 0] == 2.0
    assert table.dtype == torch.float32


def test_a_raising_reward_names_the_function_step_and_sample(tmp_path):
    reward = _reward_from(tmp_path, "    return [1.0 / len(c) for c in completions]\n")
    with pytest.raises(RewardError) as err:
        score([reward], ["first prompt", "second prompt"], ["ok", ""], {}, step=12)
    message = str(err.value)
    assert "reward function 'bad' raised ZeroDivisionError" in message
    assert "at step 12, on sample 1 (prompt 'second prompt')" in message


def test_a_reward_that_raises_only_on_the_batch(tmp_path):
    reward = _reward_from(tmp_path, "    if len(completions) > 1:\n        raise RuntimeError('batch too big')\n")
    with pytest.raises(RewardError, match="raised RuntimeError: batch too big at step 3, on the batch"):
        score([reward], ["a", "b"], ["x", "y"], {}, step=3)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    return [1.0]\n", "returned 1 value(s) for 2 completions at step 5 (samples 0-1)"),
        ("    return 1.0\n", "returned a float at step 5; it must return a list"),
        ("    return [1.0, 'yes']\n", "returned a str ('yes') at step 5 for sample 1 (prompt 'b')"),
        ("    return [float('nan'), 1.0]\n", "returned a non-finite number (nan) at step 5 for sample 0 (prompt 'a')"),
        ("    return [1.0, [2.0]]\n", "returned a list ([2.0]) at step 5 for sample 1"),
    ],
)
def test_bad_return_values_are_named(tmp_path, body, message):
    reward = _reward_from(tmp_path, body)
    with pytest.raises(RewardError) as err:
        score([reward], ["a", "b"], ["x", "y"], {}, step=5)
    assert message in str(err.value)
    assert "'bad'" in str(err.value)


def test_numpy_and_torch_scalars_and_bools_are_numbers(tmp_path):
    reward = _reward_from(
        tmp_path, "    import numpy as np, torch\n    return [np.float32(0.5), torch.tensor(2.0), True]\n"
    )
    assert score([reward], ["a"] * 3, ["x"] * 3, {}, step=0)[:, 0].tolist() == [0.5, 2.0, 1.0]
