"""metrics.jsonl on resume: the records after the checkpoint are dropped, a crash's half-written line too."""

from __future__ import annotations

import json

from aift.training.reporting import MetricsLogger


def test_resume_drops_later_steps_and_a_half_written_last_line(tmp_path):
    records = [{"type": "train", "step": s, "loss": 3.0 - s / 10} for s in (1, 2, 3, 4)]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"type": "train", "step": 5, "lo'
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
    logger = MetricsLogger(tmp_path, report_to=[], run_config={}, resume_step=2)
    logger.log({"type": "train", "step": 3, "loss": 9.0})
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [*records[:2], {"type": "train", "step": 3, "loss": 9.0}]
    assert lines[0] == json.dumps(records[0])  # rewritten as the logger writes them
