"""Fixtures for the inference tests."""

from __future__ import annotations

import pytest
from post_helpers import make_lora_adapter


@pytest.fixture(scope="session")
def alpaca_adapter(tmp_path_factory, tiny_model_dir):
    """A random LoRA adapter on the tiny model whose aift_meta.json says it was trained in alpaca format."""
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("alpaca-adapter"), prompt_format="alpaca")
