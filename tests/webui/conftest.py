"""The `server` fixture: a real `aift webui` on a temporary runs dir, reading the repo's data/ and a scratch
folder; `pairs_file`: small preference data in that folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from studio_flow import write_pairs
from webui_server import REPO, Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The UI on the repo's data/ and a scratch data folder (``server.data_dirs[-1]``) that tests write to."""
    scratch = tmp_path_factory.mktemp("webui-data")
    with Server(tmp_path_factory.mktemp("webui") / "runs", [REPO / "data", scratch]) as running:
        yield running


@pytest.fixture
def pairs_file(server) -> Path:
    """studio_flow.PAIRS as JSONL in the server's scratch data folder."""
    return write_pairs(server.data_dirs[-1] / "pairs.jsonl")


@pytest.fixture(scope="module")
def untied_tiny_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """tiny_model_dir with its own random output layer: a random model with tied embeddings repeats its last
    prompt token (here a newline), so its answers would all be empty after stripping."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    torch.manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
    path = tmp_path_factory.mktemp("tiny-untied")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path
