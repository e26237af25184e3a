"""Fixtures of the distributed tests: a small prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tokenizer) -> Path:
    """A prepared dataset (the `aift prepare` layout) of 22 short chat examples, loss on the answers only."""
    from datasets import Dataset, DatasetDict

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(offset, offset + n):
            prompt = f"<|im_start|>user\n{i} たす {i % 7} は?<|im_end|>\n<|im_start|>assistant\n"
            answer = f"{i + i % 7} です。" + "とても" * (i % 5) + "<|im_end|>\n"
            p, a = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"]
            out.append(
                {
                    "input_ids": p + a,
                    "attention_mask": [1] * (len(p) + len(a)),
                    "labels": [-100] * len(p) + a,
                    "text": prompt + answer,
                }
            )
        return out

    path = tmp_path_factory.mktemp("prepared")
    DatasetDict({"train": Dataset.from_list(rows(18, 0)), "test": Dataset.from_list(rows(4, 100))}).save_to_disk(path)
    (path / "prepare.json").write_text(json.dumps({"source": "test", "format": "chatml", "prompt_format": "chatml"}))
    return path
