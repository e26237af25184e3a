"""`aift train` end to end on the embedded model (few steps, short rows), its config layering and its errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aift.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory, embedded_dir) -> Path:
    from aift.data.prepare import prepare_dataset

    return prepare_dataset(
        model=str(embedded_dir), source="json", source_path=REPO / "data" / "ja_qa.json", num_samples=8,
        output_dir=tmp_path_factory.mktemp("cli-data") / "ja8", max_length=48, val_ratio=0.25,
    )  # fmt: skip


def _common(model, data, out) -> list[str]:
    return [
        "train", "--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(out),
        "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "48",
        "--learning-rate", "1e-3", "--warmup-steps", "0", "--logging-steps", "1", "--eval-steps", "0",
        "--save-steps", "0", "--report-to", "none", "--no-fp16", "--seed", "1",
    ]  # fmt: skip


def _train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


METHODS = {
    "full": ["--no-gradient-checkpointing"],
    "lora": ["--use-lora", "--lora-r", "4", "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj",
             "--gradient-checkpointing"],
    "qlora-4bit": ["--use-lora", "--use-4bit", "--lora-r", "4", "--no-gradient-checkpointing"],
    "qlora-8bit": ["--use-lora", "--use-8bit", "--lora-r", "4", "--no-gradient-checkpointing"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_train_end_to_end(method, embedded_dir, tiny_prepared, tmp_path, capsys):
    out = tmp_path / method
    assert main([*_common(embedded_dir, tiny_prepared, out), *METHODS[method]]) == 0
    assert f"output: {out}" in capsys.readouterr().out
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 2
    assert summary["method"] == method.split("-")[0]
    assert summary["prompt_format"] == json.loads((tiny_prepared / "prepare.json").read_text())["prompt_format"]
    assert summary["initial_eval_loss"] is not None  # the prepared test split is evaluated
    final = out / "final"
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (final / weights).is_file() and (final / "aift_meta.json").is_file()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    if method.startswith("qlora"):
        assert resolved["LoRAConfig"]["use_qlora"] and resolved["LoRAConfig"]["qlora_4bit"] == (method == "qlora-4bit")
    losses = [r["loss"] for r in _train_records(out)]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)


@pytest.mark.slow
def test_resume_latest_continues_the_step_count(embedded_dir, tiny_prepared, tmp_path):
    out = tmp_path / "resume"
    args = [*_common(embedded_dir, tiny_prepared, out), "--use-lora", "--lora-r", "4", "--save-steps", "1"]
    assert main(args) == 0
    assert main([*args, "--max-steps", "3", "--resume-from-checkpoint", "latest"]) == 0
    assert [r["step"] for r in _train_records(out)] == [1, 2, 3]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3


ALL_LINEAR_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["flag", "key=value", "yaml"])
def test_all_linear_target_modules_from_each_entry_point(entry, embedded_dir, tiny_prepared, tmp_path):
    """`all-linear` (README, --help) and `all` (LLaMA-Factory's word) adapt every linear layer but lm_head."""
    out = tmp_path / entry
    args = [*_common(embedded_dir, tiny_prepared, out), "--max-steps", "1", "--no-gradient-checkpointing"]
    if entry == "flag":
        args += ["--use-lora", "--lora-r", "2", "--lora-target-modules", "all-linear"]
    elif entry == "key=value":
        args += ["--use-lora", "--lora-r", "2", "lora.target_modules=all"]
    else:
        config = tmp_path / "lora.yaml"
        config.write_text("lora:\n  r: 2\n  target_modules: all-linear\n")
        args.insert(1, str(config))
    assert main(args) == 0
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == ALL_LINEAR_LAYERS
    assert yaml.safe_load((out / "config.yaml").read_text())["LoRAConfig"]["target_modules"] == "all-linear"


# Library messages that mean nothing to a user (aift.utils.library_noise): none may reach a train run's screen.
LIBRARY_NOISE = (
    "Failed to load CPU gemm_4bit_forward",
    "`is_gradient_checkpointing` is deprecated",
    "`gradient_checkpointing_enable` is deprecated",
    "Setting accelerator to CPU",
)


@pytest.mark.slow
def test_train_first_screen_has_no_library_noise(tiny_model_dir, tiny_prepared, tmp_path):
    """`aift train --help` and a LoRA run with gradient checkpointing, as a user starts them (a new process)."""
    help_run = subprocess.run([sys.executable, "-m", "aift", "train", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and help_run.stderr == ""
    args = [*_common(tiny_model_dir, tiny_prepared, tmp_path / "out"), "--use-lora", "--lora-r", "2"]
    args += ["--gradient-checkpointing", "--warmup-steps", "5"]
    run = subprocess.run([sys.executable, "-m", "aift", *args], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    screen = run.stdout + run.stderr
    # `in`, not startswith: DeepSpeed's logger puts a time stamp and "[WARNING]" before its message.
    assert not [line for line in screen.splitlines() if any(n in line for n in LIBRARY_NOISE) or "Warning: `" in line]
    assert "training 2 steps" in run.stderr and "on cpu" in run.stderr  # aift's own lines stay
    assert "warmup_steps=5 >= total steps 2" in run.stderr  # and so do its warnings


def _make_prepared(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset, DatasetDict, Features, List, Value

    features = Features({"input_ids": List(Value("int64")), "labels": List(Value("int64"))})
    columns = {k: [r[k] for r in rows] for k in ("input_ids", "labels")}
    split = Dataset.from_dict(columns, features=features)
    DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "batch_size must be a positive number"),
        (["--gradient-accumulation-steps", "0"], "gradient_accumulation_steps must be a positive number"),
        (["learning_rat=1e-3"], "did you mean 'learning_rate'"),
        (["--use-4bit", "--use-8bit"], "choose one of --use-4bit and --use-8bit"),
        (["--dataset-path", "/nonexistent/data"], "does not exist"),
    ],
)
def test_config_errors_are_clear(extra, message, tiny_model_dir, tiny_prepared, tmp_path, capsys):
    assert main([*_common(tiny_model_dir, tiny_prepared, tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aift train: error: ") and message in err


def test_data_errors_and_busy_output_dir(tiny_model_dir, tiny_prepared, tmp_path, capsys):
    empty = _make_prepared(tmp_path / "empty", [])
    untrained = _make_prepared(tmp_path / "untrained", [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])
    assert main(_common(tiny_model_dir, empty, tmp_path / "a")) == 2
    assert "dataset is empty" in capsys.readouterr().err
    assert main(_common(tiny_model_dir, untrained, tmp_path / "b")) == 2
    assert "no trained tokens" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text("{}\n")
    assert main(_common(tiny_model_dir, tiny_prepared, busy)) == 2
    assert "holds another run" in capsys.readouterr().err


def test_yaml_then_overrides_then_flags(tmp_path):
    from aift.cli.train import add_arguments, resolve

    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1.0e-4\nbatch_size: 3\nmax_steps: 7\nlora:\n  r: 8\n  lora_alpha: 16\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(config), "batch_size=5", "max_steps=9", "lora.r=4", "--max-steps", "11"])
    training, lora = resolve(args).training, resolve(args).lora
    assert (training.learning_rate, training.batch_size, training.max_steps) == (1e-4, 5, 11)
    assert (lora.r, lora.lora_alpha, lora.use_qlora) == (4, 16, False)
    full = resolve(parser.parse_args(["--batch-size", "2"]))
    assert full.lora is None and full.preference is None and full.training.batch_size == 2


def test_train_sft_script_takes_exactly_the_same_flags():
    def flags(cmd):
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return sorted({w.strip("[],") for w in text.split() if w.startswith(("--", "[--"))})

    ours = flags([sys.executable, "-m", "aift", "train", "--help"])
    script = flags([sys.executable, str(REPO / "scripts" / "train_sft.py"), "--help"])
    assert ours == script
    for flag in (
        "--model-name",
        "--use-lora",
        "--lora-target-modules",
        "--use-4bit",
        "--use-8bit",
        "--packing",
        "--no-packing",
        "--deepspeed",
        "--resume-from-checkpoint",
        "--report-to",
        "--use-flash-attention",
    ):
        assert flag in ours, flag
