"""Fixtures for eval and report tests: a prepared dataset and a trained tiny LoRA adapter (see eval_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_fixtures import QA, train_tiny_adapter, write_prepared


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory, tokenizer) -> Path:
    """A prepared dataset folder with train/test splits, prompt and reference columns."""
    return write_prepared(tmp_path_factory.mktemp("prepared") / "ds", tokenizer, QA, QA)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """A LoRA adapter trained on the fixture rows on top of the tiny model, with aift_meta.json."""
    return train_tiny_adapter(tiny_model_dir, tokenizer, tmp_path_factory.mktemp("adapter") / "final")
