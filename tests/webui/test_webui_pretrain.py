"""The data page prepares raw text (`--task pretrain`), and the runs page trains sft on it."""

from __future__ import annotations

import json


def test_raw_text_is_prepared_and_previewed(server):
    corpus = server.data_dirs[-1] / "brewery.jsonl"
    rows = [{"text": f"記録第{i}号。麹室の温度は三十度に保つ。"} for i in range(8)]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    options = {"task": "pretrain", "max_length": "64", "val_ratio": "0.25"}
    status, body = server.request("/api/prepare", {"source_path": corpus.name, "name": "brewery", "options": options})
    assert status == 200, body
    info = json.loads((server.runs_dir / "datasets" / "brewery" / "prepare.json").read_text())
    assert info["task"] == "pretrain" and info["documents"]["kept"] == 8
    status, preview = server.request(f"/api/preview?path={body['path']}&n=1")
    assert status == 200, preview
    bad = {**options, "train_on_prompt": True}
    status, body = server.request("/api/prepare", {"source_path": corpus.name, "name": "b2", "options": bad})
    assert status == 400 and "train_on_prompt does not apply" in body["error"]
