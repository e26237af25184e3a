"""GRPO over real processes (gloo on loopback): 2 processes x 2 prompts equal 1 process x 2 prompts x 2
accumulation steps: the same completions (seeded per micro-batch), advantages over whole groups, the same losses."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import two_processes_and_one

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_ddp_grpo_equals_one_process_with_accumulation(tmp_path, tiny_model_dir):
    from aift.data.prepare import prepare_dataset

    data = prepare_dataset(model=str(tiny_model_dir), source_path=REPO / "examples" / "tasks.json",
                           output_dir=tmp_path / "data", max_length=64, val_ratio=0)  # fmt: skip
    common = {"method": "grpo", "use-lora": True, "lora-r": 4, "lora-dropout": 0.0, "learning-rate": 1e-2,
              "batch-size": 4, "num-generations": 2, "max-completion-length": 6, "reward": "length:30",
              "scale-rewards": "batch", "max-steps": 2, "save-steps": 0, "warmup-steps": 0}  # fmt: skip
    runs = two_processes_and_one(tiny_model_dir, data, tmp_path, **common)
    assert sorted(runs["two"]) == sorted(runs["one"]) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "grad_norm", "reward", "reward_std", "completions/mean_length", "entropy"):
            assert runs["two"][step][key] == pytest.approx(runs["one"][step][key], abs=1e-4), (step, key)
    assert all(runs["one"][step]["reward_std"] > 0 and runs["one"][step]["grad_norm"] > 0 for step in (1, 2))
