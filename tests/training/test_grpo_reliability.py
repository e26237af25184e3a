"""GRPO under the loop's guards, on the tiny model: gradient checkpointing changes nothing but memory, a step
whose rewards make the gradient non-finite stops the run (or is skipped, counted), and SIGTERM saves a
checkpoint from which the run resumes to the same completions and losses."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_helpers import child_env, wait_for

from aift.cli import main

REPO = Path(__file__).resolve().parents[2]


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A short LoRA GRPO run; a length reward makes a group's rewards differ on the random tiny model."""
    return [
        "train", "--method", "grpo", "--model-name", str(model_dir), "--dataset-path", str(data),
        "--output-dir", str(out), "--use-lora", "--lora-r", "4", "--lora-dropout", "0",
        "--reward", "exact_match", "--reward", "length:30", "--num-generations", "2", "--batch-size", "4",
        "--max-completion-length", "6", "--max-length", "64", "--max-steps", "2", "--save-steps", "0",
        "--logging-steps", "1", "--log-completions-steps", "1", "--gradient-accumulation-steps", "1",
        "--learning-rate", "1e-2", "--warmup-steps", "0", "--lr-scheduler", "constant_with_warmup",
        "--report-to", "none", "--seed", "3", "--no-bf16", "--no-fp16", *extra,
    ]  # fmt: skip


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _records(out: Path, kind: str = "train") -> dict[int, dict]:
    return {r["step"]: r for r in _lines(out / "metrics.jsonl") if r["type"] == kind}


def _completions(out: Path) -> dict[int, list[tuple[str, str]]]:
    by_step: dict[int, list[tuple[str, str]]] = {}
    for e in _lines(out / "completions.jsonl"):
        by_step.setdefault(e["step"], []).append((e["prompt"], e["completion"]))
    return by_step


def test_gradient_checkpointing_gives_the_same_completions_loss_and_gradient(tmp_path, tiny_model_dir, tasks):
    """The rollout generates with the KV cache although the training forward is checkpointed."""
    off, on = tmp_path / "off", tmp_path / "on"
    assert main([*_args(tiny_model_dir, tasks, off, "--no-gradient-checkpointing"), "--max-steps", "1"]) == 0
    assert main([*_args(tiny_model_dir, tasks, on, "--gradient-checkpointing"), "--max-steps", "1"]) == 0
    assert yaml_value(on / "config.yaml", "gradient_checkpointing") is True
    assert _completions(on) == _completions(off)
    a, b = _records(off)[1], _records(on)[1]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4) and a["grad_norm"] > 0


def yaml_value(path: Path, key: str):
    import yaml

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    return next(section[key] for section in config.values() if isinstance(section, dict) and key in section)


# Step 2's rewards are finite but huge: with scale_rewards none the advantages are too, and the gradient
# overflows fp32 (inf grad norm), as a reward bug or a diverging run would make it.
HUGE_REWARD = """
CALLS = []


def huge(prompts, completions, trainer_state=None, **kwargs):
    CALLS.append(trainer_state.global_step)
    scale = 1e30 if CALLS.count(1) == 1 and trainer_state.global_step == 1 else 1.0  # once: a retried step is fine
    return [scale * (len(c) % 3) for c in completions]
"""


def _huge_reward_args(tmp_path: Path, tiny_model_dir, tasks, out: Path, *extra: str) -> list[str]:
    reward = tmp_path / "huge.py"
    reward.write_text(HUGE_REWARD, encoding="utf-8")
    args = _args(tiny_model_dir, tasks, out, "--no-gradient-checkpointing", "--scale-rewards", "none", *extra)
    at = args.index("exact_match")
    args[at] = f"python:{reward}:huge"
    return args


def test_a_non_finite_gradient_stops_the_run_naming_the_step_and_checkpoint(tmp_path, tiny_model_dir, tasks, capsys):
    out = tmp_path / "stopped"
    assert (
        main([*_huge_reward_args(tmp_path, tiny_model_dir, tasks, out), "--max-steps", "3", "--save-steps", "1"]) == 2
    )
    error = capsys.readouterr().err
    assert "error: step 2: non-finite loss" in error and "grad norm inf" in error.replace("nan", "inf"), error[-2000:]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'checkpoint-1'}" in error
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert not (out / "final").exists()


def test_skip_nonfinite_steps_skips_a_grpo_step_and_counts_it(tmp_path, tiny_model_dir, tasks):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "skipped"
    args = _huge_reward_args(tmp_path, tiny_model_dir, tasks, out, "--skip-nonfinite-steps", "1")
    assert main([*args, "--max-steps", "3"]) == 0
    (skipped,) = _records(out, "skipped_step").values()
    assert skipped["step"] == 2 and skipped["skipped_nonfinite_steps"] == 1
    assert sorted(_records(out)) == [1, 2, 3]  # the skipped step is not counted: three trained steps
    assert all(r["loss"] == r["loss"] and r["grad_norm"] < 1e6 for r in _records(out).values())
    weights = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_to_the_same_completions_and_losses(tmp_path, tiny_model_dir, tasks):
    broken, straight = tmp_path / "broken", tmp_path / "straight"
    command = [sys.executable, "-m", "aift", *_args(tiny_model_dir, tasks, broken, "--no-gradient-checkpointing")]
    command += ["--max-steps", "300", "--no-tcmalloc"]
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(broken / "metrics.jsonl", proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-2000:]
    assert "aift train: stopped by SIGTERM after saving a checkpoint" in output and "Traceback" not in output
    (checkpoint,) = (broken / "checkpoints").glob("checkpoint-*")
    k = int(re.search(r"checkpoint-(\d+)", checkpoint.name).group(1))
    total = str(k + 2)

    resume = ["--max-steps", total, "--resume-from-checkpoint", "latest", "--no-gradient-checkpointing"]
    assert main([*_args(tiny_model_dir, tasks, broken), *resume]) == 0
    assert main([*_args(tiny_model_dir, tasks, straight, "--no-gradient-checkpointing"), "--max-steps", total]) == 0
    resumed, reference = _records(broken), _records(straight)
    assert sorted(resumed) == sorted(reference) == list(range(1, k + 3))
    got, want = _completions(broken), _completions(straight)
    for step in (k + 1, k + 2):
        assert got[step] == want[step], step
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-6), step
        assert resumed[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4), step
