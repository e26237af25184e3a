"""`aift plan`'s prediction against the peak memory of real training steps on the embedded model.

The steps run in a child process (bench/plan/measure.py, the bench of bench/results/plan/), so that the
peak is that training's and not this test session's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from aift.distributed.planning import plan_training

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15  # the bench's: bench/plan/run.py


def load_bench_measure():
    spec = importlib.util.spec_from_file_location("plan_bench_measure", REPO / "bench" / "plan" / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_plan_predicts_the_measured_peak_of_full_finetuning(embedded_dir, tmp_path):
    config = {"method": "full", "batch_size": 1, "max_length": 128, "gradient_checkpointing": True, "dtype": "fp32"}
    measured = load_bench_measure().measure_in_child({"model": "smollm2-135m-instruct", **config}, tmp_path)
    assert measured["peak_reset_after_load"]
    plan = plan_training(
        str(embedded_dir),
        gpus=1,
        gpu_memory_gb=1000,
        method=config["method"],
        batch_size=config["batch_size"],
        max_length=config["max_length"],
        gradient_checkpointing=config["gradient_checkpointing"],
        dtype=config["dtype"],
    )
    predicted = plan.devices[0].estimate.total / 1e9
    assert abs(predicted / measured["measured_gb"] - 1) <= TOLERANCE, (predicted, measured)
