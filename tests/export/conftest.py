"""Fixtures for the export tests: a random LoRA adapter on the tiny model, merged once."""

from __future__ import annotations

import pytest
from post_helpers import make_lora_adapter


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir):
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-adapter"), prompt_format="chatml")


@pytest.fixture(scope="session")
def tiny_merged(tmp_path_factory, tiny_adapter):
    from aift.export.merge import merge_adapter

    return merge_adapter(tiny_adapter, tmp_path_factory.mktemp("merged") / "out", dtype="fp32")
