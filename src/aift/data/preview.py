"""What a prepared dataset trains on: examples with the trained tokens marked, counts and warnings."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aift.data.packing import IGNORE_INDEX, count_trained_tokens
from aift.data.prepared import read_split
from aift.data.reasoning import thinking_runs


@dataclass
class ExamplePreview:
    """One example split into runs of (text, trained)."""

    index: int
    runs: list[tuple[str, bool]]
    trained: int
    masked: int
    warnings: list[str] = field(default_factory=list)

    def bracketed(self) -> str:
        """The text with trained runs in ``[[...]]``."""
        return "".join(f"[[{text}]]" if trained else text for text, trained in self.runs)

    def styled(self) -> list[tuple[str, bool, bool]]:
        """The runs as (text, trained, thinking): reasoning inside ``<think>...</think>`` marked, to be shown in a
        colour of its own."""
        return thinking_runs(self.runs)


@dataclass
class DatasetPreview:
    examples: list[ExamplePreview]
    trained: int
    masked: int
    warnings: list[str]
    info: dict


def _runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((tokenizer.decode(input_ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return runs


def _example_warnings(runs: list[tuple[str, bool]], end_markers: list[str]) -> list[str]:
    trained = [text for text, is_trained in runs if is_trained]
    if not trained:
        return ["no trained tokens"]
    if end_markers and not all(t.rstrip().endswith(tuple(m.strip() for m in end_markers)) for t in trained):
        return [f"an answer does not end with the end-of-turn marker ({' or '.join(end_markers)})"]
    return []


def _dataset_warnings(dataset, info: dict, tokenizer) -> list[str]:
    warnings = []
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        if info.get("format") != "template":
            warnings.append(
                f"the data uses format {info.get('format')!r} but the model has its own chat template; "
                "prepare with --format template unless you mean it"
            )
        elif info.get("chat_template_sha256") not in (None, hashlib.sha256(template.encode()).hexdigest()):
            warnings.append("the model's chat template changed since this data was prepared; prepare it again")
    counts = Counter(tuple(ids) for ids in dataset["input_ids"])
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    if duplicates:
        warnings.append(f"{duplicates} duplicate example(s) in this split")
    return warnings


def preview_dataset(path: str | Path, n: int = 3, split: str = "train", tokenizer=None) -> DatasetPreview:
    """The first ``n`` examples of a prepared split, with trained runs, counts and warnings.

    Args:
        path: A folder written by ``prepare_dataset``.
        n: Number of examples to show.
        split: ``train`` or ``test``.
        tokenizer: The tokenizer to decode with (default: the one named in prepare.json).

    Returns:
        A DatasetPreview; counts and dataset warnings cover the whole split.
    """
    dataset, info = read_split(path, split, with_prepare_json=True)
    if tokenizer is None:
        from aift.models.loading import load_tokenizer

        tokenizer = load_tokenizer(info["tokenizer"])
    end_markers = [] if info.get("train_on_prompt") else [m for m in info.get("end_of_turn", []) if m.strip()]
    examples = []
    for i in range(min(n, len(dataset))):
        row = dataset[i]
        runs = _runs(tokenizer, row["input_ids"], row["labels"])
        trained = count_trained_tokens(row["labels"])
        examples.append(
            ExamplePreview(i, runs, trained, len(row["labels"]) - trained, _example_warnings(runs, end_markers))
        )
    trained_total = sum(count_trained_tokens(labels) for labels in dataset["labels"])
    masked_total = sum(len(labels) for labels in dataset["labels"]) - trained_total
    warnings = _dataset_warnings(dataset, info, tokenizer)
    no_trained = sum(count_trained_tokens(labels) == 0 for labels in dataset["labels"])
    if no_trained:
        warnings.append(f"{no_trained} example(s) have no trained tokens")
    return DatasetPreview(examples, trained_total, masked_total, warnings, info)
