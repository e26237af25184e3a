"""Fixtures for the training tests: a small prepared dataset and a fp32 config factory for the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory, embedded_dir) -> Path:
    """24 rows of the bundled Japanese Q&A, prepared for the embedded tokenizer (train/test splits)."""
    from aift.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "ja_qa_small"
    return prepare_dataset(
        model=str(embedded_dir),
        source="json",
        source_path=REPO / "data" / "ja_qa.json",
        num_samples=24,
        output_dir=out,
        max_length=96,
        val_ratio=0.25,
    )


@pytest.fixture
def fp32_config(tmp_path, tiny_model_dir):
    """A factory of TrainingConfig for short, exact fp32 CPU runs of the tiny model."""
    from aift.config import TrainingConfig

    def make(**overrides):
        values = dict(
            model_name=str(tiny_model_dir),
            output_dir=str(tmp_path / "run"),
            batch_size=2,
            gradient_accumulation_steps=1,
            max_steps=3,
            warmup_steps=0,
            learning_rate=1e-3,
            fp16=False,
            bf16=False,
            gradient_checkpointing=False,
            logging_steps=1,
            eval_steps=0,
            save_steps=0,
            max_length=64,
            report_to=["none"],
            seed=0,
        )
        values.update(overrides)
        return TrainingConfig(**values)

    return make


def _read_metrics(output_dir, kind="train") -> list[dict]:
    import json

    lines = (Path(output_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture
def read_metrics():
    """read_metrics(output_dir, kind="train"): the records of metrics.jsonl of one type."""
    return _read_metrics


@pytest.fixture(scope="session")
def tasks(tmp_path_factory, embedded_dir) -> Path:
    """examples/tasks.json (sums with a number as the answer) prepared for the embedded tokenizer, no test split."""
    from aift.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("grpo-data") / "tasks"
    return prepare_dataset(
        model=str(embedded_dir), source_path=REPO / "examples" / "tasks.json", output_dir=out, max_length=64,
        val_ratio=0,
    )  # fmt: skip
