"""The web UI's export endpoint: aift.export.run_export on a run's final/, with the one GGUF quant list."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from post_helpers import make_lora_adapter

from aift.export.run import GGUF_QUANTS
from aift.webui.app import create_app


@pytest.fixture(scope="module")
def client_and_run(tmp_path_factory, tiny_model_dir):
    runs_dir = tmp_path_factory.mktemp("webui-export") / "runs"
    run = runs_dir / "tiny-lora"
    make_lora_adapter(tiny_model_dir, run / "final")
    return TestClient(create_app(runs_dir, []), base_url="http://127.0.0.1"), run


def test_a_gguf_export_of_a_lora_run_is_merged_written_and_verified(client_and_run):
    client, run = client_and_run
    response = client.post("/api/runs/tiny-lora/export", json={"format": "gguf", "quant": "f32"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file"] == "tiny-lora.f32.gguf" and (run / "exports" / body["file"]).is_file()
    assert body["passed"] is True and body["greedy_match"] is True and body["size_mb"] > 0
    assert [p.name for p in (run / "exports").iterdir()] == ["tiny-lora.f32.gguf"]  # no merge folder left


def test_the_quant_choices_are_the_writers(client_and_run):
    client, _ = client_and_run
    response = client.post("/api/runs/tiny-lora/export", json={"format": "gguf", "quant": "q4_k"})
    assert response.status_code == 400
    assert f"quant must be one of {', '.join(GGUF_QUANTS)}" in response.json()["error"]
