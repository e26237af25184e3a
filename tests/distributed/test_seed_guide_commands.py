"""The SFT guide's commands, verbatim: `configs/ds_config_7b.json` exists and passes the checks every DeepSpeed
preset passes, and `scripts/train_sft.py` / `datasets/prepare_custom_dataset.py` accept each command's flags.

The scripts are run as the launcher runs them (``deepspeed`` adds ``--local_rank=N``), with the command's
``run`` replaced by a recorder, so nothing trains: what is checked is that the arguments parse and resolve
into the config the command means. What cannot run here is stated: the 7B model is a gated hub download and
the multi-node launch needs GPUs.
"""

from __future__ import annotations

import json
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from optional_pieces import import_optional

from aift.config import TrainingConfig
from aift.distributed.launch import WorldSizeMismatchError, check_local_rank_has_a_gpu
from aift.distributed.trainer import deepspeed_plugin, resolve_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
DS_7B = "configs/ds_config_7b.json"

# The multi-node command of the SFT guide (8 nodes x 8 GPUs), as written there.
MULTI_NODE = """deepspeed --num_nodes 8 --num_gpus 64 --hostfile hostfile scripts/train_sft.py
    --model-name meta-llama/Llama-2-7b-hf --dataset-path datasets/alpaca_Llama-2-7b-hf_10000
    --output-dir ./outputs/llama2-7b-distributed --deepspeed configs/ds_config_7b.json
    --batch-size 16 --gradient-accumulation-steps 1 --bf16"""
# The guide's single-node training commands.
TRAIN_COMMANDS = [
    """python3 scripts/train_sft.py --model-name meta-llama/Llama-2-7b-hf
    --dataset-path datasets/alpaca_Llama-2-7b-hf_10000 --output-dir ./outputs/llama2-7b-alpaca --num-epochs 3
    --batch-size 4 --learning-rate 2e-4 --use-lora --gradient-checkpointing --bf16""",
    """python3 scripts/train_sft.py --model-name meta-llama/Llama-2-7b-hf
    --dataset-path datasets/alpaca_Llama-2-7b-hf_10000 --output-dir ./outputs/llama2-7b-lora --use-lora --lora-r 16
    --lora-alpha 32 --lora-dropout 0.1 --lora-target-modules q_proj,k_proj,v_proj,o_proj --batch-size 8
    --gradient-accumulation-steps 2 --bf16""",
    """python3 scripts/train_sft.py --model-name meta-llama/Llama-2-70b-hf
    --dataset-path datasets/alpaca_Llama-2-70b-hf_10000 --output-dir ./outputs/llama2-70b-qlora --use-4bit --use-lora
    --batch-size 1 --gradient-accumulation-steps 16 --bf16""",
    """python3 scripts/train_sft.py --model-name gpt2 --dataset-path datasets/alpaca_gpt2_100
    --output-dir ./test_output --num-epochs 1 --batch-size 2 --logging-steps 1 --save-steps 10""",
]
PREPARE_COMMANDS = [
    "python3 datasets/prepare_custom_dataset.py --model meta-llama/Llama-2-7b-hf --source alpaca --num-samples 10000 --format alpaca",
    "python3 datasets/prepare_custom_dataset.py --model meta-llama/Llama-2-7b-hf --source dolly --num-samples 5000 --format alpaca",
    "python3 datasets/prepare_custom_dataset.py --model meta-llama/Llama-2-7b-hf --source wizardlm --num-samples 20000 --format alpaca",
    "python3 datasets/prepare_custom_dataset.py --model meta-llama/Llama-2-7b-hf --source json --source-path ./data.json --format alpaca",
    "python3 datasets/prepare_custom_dataset.py --model meta-llama/Llama-2-7b-hf --source csv --source-path ./data.csv --format alpaca",
]


def _script_and_args(command: str) -> tuple[str, list[str]]:
    """The script a command runs and its arguments (after the launcher's or python's own options)."""
    words = shlex.split(command)
    at = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[at], words[at + 1 :]


def _run_script(monkeypatch, module: str, script: str, args: list[str]):
    """Runs the script as __main__ with `module.run` replaced by a recorder; returns the parsed arguments."""
    seen = []
    monkeypatch.setattr(f"{module}.run", lambda parsed: seen.append(parsed) or 0)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_.value.code == 0 and len(seen) == 1
    return seen[0]


def _train_configs(monkeypatch, command: str):
    from aift.cli.train import resolve

    script, args = _script_and_args(command)
    if command.startswith("deepspeed"):
        args = ["--local_rank=0", *args]  # what the deepspeed launcher passes to every process
    configs = resolve(_run_script(monkeypatch, "aift.cli.train", script, args))
    return configs.training, configs.lora


def test_ds_config_7b_is_zero2_with_every_batch_setting_from_aift():
    ds = json.loads((ROOT / DS_7B).read_text())
    assert ds["zero_optimization"]["stage"] == 2
    auto = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
    assert all(ds[key] == "auto" for key in auto)
    # overlap_comm holds about 4.5x the buckets: 2e8-element buckets keep that under 4 GB per GPU at 7B.
    assert ds["zero_optimization"]["reduce_bucket_size"] <= 2e8 and ds["zero_optimization"]["overlap_comm"]


def test_multi_node_command_resolves_the_7b_config_for_64_gpus(monkeypatch):
    monkeypatch.chdir(ROOT)
    training, lora = _train_configs(monkeypatch, MULTI_NODE)
    assert lora is None and training.deepspeed == DS_7B and training.bf16 is True
    assert (training.batch_size, training.gradient_accumulation_steps) == (16, 1)
    resolved = resolve_deepspeed_config(training.deepspeed, training, world_size=64)
    assert resolved["train_batch_size"] == 16 * 64 and resolved["gradient_clipping"] == training.max_grad_norm
    plugin = deepspeed_plugin(resolved)  # Accelerate's DeepSpeed plugin, as training builds it
    assert plugin.zero_stage == 2 and not plugin.hf_ds_config.is_offload()


def test_ds_config_7b_passes_deepspeeds_own_parser():
    import_optional("deepspeed", "DeepSpeed is not installed (make test installs it)")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = TrainingConfig(batch_size=16, gradient_accumulation_steps=1)
    parsed = DeepSpeedConfig(resolve_deepspeed_config(str(ROOT / DS_7B), config, world_size=1))
    assert parsed.zero_optimization_stage == 2 and parsed.train_micro_batch_size_per_gpu == 16
    assert parsed.zero_config.offload_optimizer is None and parsed.zero_config.overlap_comm


@pytest.mark.parametrize("command", TRAIN_COMMANDS, ids=["lora", "lora-targets", "qlora-70b", "debug-gpt2"])
def test_guide_train_commands_parse_verbatim(monkeypatch, command):
    training, lora = _train_configs(monkeypatch, command)
    args = shlex.split(command)
    assert training.output_dir == args[args.index("--output-dir") + 1]
    assert (lora is not None) == ("--use-lora" in args)
    if "--lora-target-modules" in args:
        assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    if "--use-4bit" in args:
        assert lora.use_qlora and lora.qlora_4bit


@pytest.mark.parametrize("command", PREPARE_COMMANDS, ids=["alpaca", "dolly", "wizardlm", "json", "csv"])
def test_guide_prepare_commands_parse_verbatim(monkeypatch, command):
    script, args = _script_and_args(command)
    parsed = _run_script(monkeypatch, "aift.cli.prepare", script, args)
    assert parsed.model == "meta-llama/Llama-2-7b-hf" and parsed.format == "alpaca"
    assert parsed.source == args[args.index("--source") + 1]


def test_more_processes_per_node_than_gpus_is_named(monkeypatch):
    """The guide's `--num_gpus 64` is a total; DeepSpeed reads it per node and starts 64 processes on each."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "7")
    check_local_rank_has_a_gpu()
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(WorldSizeMismatchError, match=r"LOCAL_RANK=8 but this node has 8 GPU.*--num_gpus 8"):
        check_local_rank_has_a_gpu()
