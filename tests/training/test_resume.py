"""Exact resume: a run SIGKILLed after a checkpoint and resumed reaches the uninterrupted run's losses."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from subprocess_helpers import child_env, wait_for


def _train_cmd(tiny_model_dir, prepared_small, output_dir, *extra) -> list[str]:
    return [
        sys.executable, "-m", "aift", "train", "--no-tcmalloc", "--use-lora",
        f"model_name={tiny_model_dir}", f"dataset_path={prepared_small}", f"output_dir={output_dir}",
        "batch_size=1", "gradient_accumulation_steps=2", "max_steps=6", "max_length=48", "warmup_steps=2", "learning_rate=1e-3",
        "save_steps=2", "save_total_limit=3", "logging_steps=1", "eval_steps=0", "fp16=false", "bf16=false",
        "gradient_checkpointing=false", "packing=false", "report_to=none", "seed=3",
        "lora.lora_dropout=0.2", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_losses(tmp_path, tiny_model_dir, prepared_small, read_metrics):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(
        _train_cmd(tiny_model_dir, prepared_small, straight), check=True, env=child_env(), capture_output=True
    )
    reference = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert sorted(reference) == list(range(1, 7))

    proc = subprocess.Popen(
        _train_cmd(tiny_model_dir, prepared_small, broken),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(broken / "checkpoints" / "checkpoint-2", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (broken / "train_summary.json").exists(), "the run finished before it could be killed"
    done = subprocess.run(
        _train_cmd(tiny_model_dir, prepared_small, broken, "resume_from_checkpoint=latest"),
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = {r["step"]: r["loss"] for r in read_metrics(broken)}
    assert sorted(resumed) == list(range(1, 7))  # records after the checkpoint were replaced, not duplicated
    k = int(re.search(r"resumed from \S+ at step (\d+)", done.stderr).group(1))
    assert 2 <= k < 6
    for step in range(k + 1, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path, tiny_model_dir, prepared_small):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _train_cmd(tiny_model_dir, prepared_small, out, "save_steps=0", "max_steps=200"),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert not (out / "train_summary.json").exists()
