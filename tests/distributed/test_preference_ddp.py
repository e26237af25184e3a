"""DPO over real processes (gloo on loopback): 2 processes x 1 pair equal 1 process x 1 pair x 2 accumulation steps."""

from __future__ import annotations

import json

import pytest
from dist_helpers import two_processes_and_one

pytestmark = pytest.mark.slow


def test_ddp_dpo_equals_one_process_with_accumulation(tmp_path, tiny_model_dir):
    from aift.data.prepare import prepare_preference

    src = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"{a} + {a} = ?", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(10, 18)]
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    data = prepare_preference(str(tiny_model_dir), source_path=src, output_dir=tmp_path / "data", val_ratio=0)
    common = {"method": "dpo", "use-lora": True, "lora-r": 4, "lora-dropout": 0.0, "learning-rate": 1e-2,
              "batch-size": 1, "max-steps": 3, "save-steps": 0}  # fmt: skip
    runs = two_processes_and_one(tiny_model_dir, data, tmp_path, **common)
    assert sorted(runs["two"]) == sorted(runs["one"]) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert runs["two"][step][key] == pytest.approx(runs["one"][step][key], abs=1e-4), (step, key)
    assert runs["two"][3]["rewards/margins"] > 0
