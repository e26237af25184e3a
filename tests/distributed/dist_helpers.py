"""Helpers of the multi-process tests: `aift train` flags and subprocesses with timeouts, metrics reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_TIMEOUT_S = 240  # one launch of a few steps of the tiny model; generous for 2 shared cores


def train_args(model_dir: Path, data: Path, out: Path, **overrides) -> list[str]:
    """`aift train` flags for a short fp32 run whose losses can be compared step by step."""
    values = {
        "model-name": str(model_dir),
        "dataset-path": str(data),
        "output-dir": str(out),
        "max-steps": 4,
        "batch-size": 2,
        "gradient-accumulation-steps": 1,
        "learning-rate": 1e-3,
        "warmup-steps": 1,
        "max-length": 64,
        "logging-steps": 1,
        "eval-steps": 0,
        "save-steps": 2,
        "save-total-limit": 5,
        "report-to": "none",
        "seed": 7,
        **overrides,
    }
    args = [f"--{k}={v}" for k, v in values.items() if v is not True and v is not None]
    args += [f"--{k}" for k, v in values.items() if v is True]
    return [*args, "--no-bf16", "--no-fp16", "--no-gradient-checkpointing", "--packing"]


def clean_env() -> dict:
    """This environment without a launcher's variables (pytest itself might run under one)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_aift(args: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python -m aift ARGS` in a subprocess (its own process group, killed on timeout)."""
    return run_with_timeout([sys.executable, "-m", "aift", *args], clean_env(), timeout)


def run_with_timeout(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and every rank it started
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(command)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def train_losses(out: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl (each step once; a second writer would show up as a duplicate)."""
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "train":
            assert record["step"] not in losses, f"step {record['step']} logged twice: more than one writer"
            losses[record["step"]] = record["loss"]
    return losses


def train_records(out: Path) -> dict[int, dict]:
    """A run's train lines of metrics.jsonl by step."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["type"] == "train"}


def two_processes_and_one(model_dir: Path, data: Path, root: Path, **common) -> dict[str, dict[int, dict]]:
    """The same run as 2 DDP processes ("two") and as 1 process with 2 accumulation steps ("one"): train records."""
    runs = {}
    for name, extra, overrides in (
        ("two", ["--nproc-per-node=2"], {}),
        ("one", [], {"gradient-accumulation-steps": 2}),
    ):
        out = root / name
        result = run_aift(["train", *train_args(model_dir, data, out, **common, **overrides), *extra])
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = train_records(out)
    return runs
