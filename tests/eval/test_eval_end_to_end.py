"""prepare -> train (LoRA, metrics collected) -> eval --compare-base -> report, on the real producers' outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aift.cli import main

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_eval_compare_base_and_report_on_a_real_run(trained_lora_run, tmp_path):
    dataset, run = trained_lora_run
    eval_json = run / "eval.json"
    argv = ["eval", "--model", str(run), "--dataset-path", str(dataset), "--compare-base", "--generate"]
    assert main([*argv, "--max-samples", "4", "--max-new-tokens", "16", "--output", str(eval_json)]) == 0
    result = json.loads(eval_json.read_text(encoding="utf-8"))
    assert result["adapter"] == str(run / "final")
    assert result["delta"]["loss"] < 0, "six LoRA steps on this data should lower the test loss"
    assert result["samples"][0]["reference"]

    assert main(["report", str(run.parent), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert 'class="complete"' in page and "ROUGE-L" in page
    assert (tmp_path / "report" / "loss.png").is_file()
    if (run / "system_metrics.jsonl").is_file():  # collect_metrics wired in by the trainer
        assert (tmp_path / "report" / "system_metrics.png").is_file()
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in train if line.get("type") == "train"]
    assert len(losses) == 6 and min(losses[-2:]) < losses[0]  # the curve the report shows falls
