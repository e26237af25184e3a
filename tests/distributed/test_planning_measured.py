"""`aift plan`'s prediction against the peak memory of real training steps on the embedded model.

The steps run in a child process (bench/plan/measure.py, the bench of bench/results/plan/), so that the
peak is that training's and not this test session's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15  # the bench's: bench/plan/run.py


def load_bench(name: str):
    """bench/plan/NAME.py: its measurement and its prediction are what this test checks against each other."""
    spec = importlib.util.spec_from_file_location(f"plan_bench_{name}", REPO / "bench" / "plan" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_plan_predicts_the_measured_peak_of_full_finetuning(embedded_dir, tmp_path):
    config = {"method": "full", "batch_size": 1, "max_length": 128, "gradient_checkpointing": True, "dtype": "fp32"}
    measured = load_bench("measure").measure_in_child({"model": "smollm2-135m-instruct", **config}, tmp_path)
    assert measured["peak_reset_after_load"]
    predicted = load_bench("run").predict({"model": str(embedded_dir), **config})["predicted_gb"]
    assert abs(predicted / measured["measured_gb"] - 1) <= TOLERANCE, (predicted, measured)
