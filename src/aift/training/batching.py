"""From whatever the user passed (prepared folder, datasets.Dataset, TextDataset, texts) to per-epoch batch plans.

A prepared folder is read by :func:`aift.data.prepared.read_prepared`, the one reader of `aift prepare` output.

A plan is the list of micro-batches of one epoch, fixed by (seed, epoch): a resumed run rebuilds the same
plan and skips the micro-batches already trained on, which is what makes resuming exact.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aift.data import DatasetError
from aift.data.packing import (
    PackedCollator,
    PaddedCollator,
    best_fit_decreasing,
    count_trained_tokens,
    length_grouped_batches,
    packing_efficiency,
)
from aift.data.prepared import read_prepared
from aift.data.pretrain import pack
from aift.data.streaming import StreamedExamples, streamed_examples

Example = dict[str, list[int]]
log = logging.getLogger(__name__)


@dataclass
class Examples:
    """Token ids and labels of one split, plus the prompt format it was rendered with (if known)."""

    rows: list[Example]
    name: str
    prompt_format: str | None = None
    # Rows `aift prepare --task pretrain` packed itself: each block's row indices, in order (None: none such).
    blocks: list[list[int]] | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(count_trained_tokens(ex["labels"]) for ex in self.rows)


def to_examples(
    source: Any, tokenizer, max_length: int, name: str, split: str = "train"
) -> Examples | StreamedExamples:
    """Token ids and labels from a prepared folder, a Dataset/DatasetDict, a TextDataset, texts or dicts.

    The train split of a folder `aift prepare --streaming` wrote is a stream (aift.training.streaming).
    """
    from aift.data.text_dataset import TextDataset

    prompt_format = None
    if isinstance(source, (str, Path)):
        path = source
        source, meta = read_prepared(path)
        if "streaming" in meta and split == "train":
            return streamed_examples(Path(path), meta, tokenizer, name)
        prompt_format = meta.get("prompt_format") or meta.get("format")
    if hasattr(source, "keys") and hasattr(source, "column_names") and isinstance(source.column_names, dict):
        if split not in source:
            raise DatasetError(f"the {name} dataset has no {split!r} split (splits: {', '.join(source.keys())})")
        source = source[split]
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], str):
        source = TextDataset(source, tokenizer, max_length=max_length)
    rows = [_example(source[i], i, name, max_length) for i in range(len(source))]
    blocks = None
    if "block" in getattr(source, "column_names", ()):
        rows, blocks = _prepared_blocks(source, rows, name, max_length)
    return Examples(rows=rows, name=name, prompt_format=prompt_format, blocks=blocks)


def first_examples(examples: Examples | None, n: int) -> Examples | None:
    """The first ``n`` examples (all for 0) of an eval split, None when it has none. Taken before the split is
    shared out, so every process evaluates its part of the same ones."""
    if examples is None or not examples.rows:
        return None
    if not n or n >= len(examples.rows):
        return examples
    blocks = examples.blocks and [kept for block in examples.blocks if (kept := [i for i in block if i < n])]
    return replace(examples, rows=examples.rows[:n], blocks=blocks)


def _prepared_blocks(source: Any, rows: list[Example], name: str, max_length: int):
    """(rows, blocks) of a pretrain dataset: each block's row indices, from its ``block`` column (-1: a row
    the trainer packs, an SFT example of a mixture).

    Blocks longer than this run's ``max_length`` are packed again at it, their pieces taken as documents (a
    piece's first token is no target either way), so every token is still trained exactly once.
    """
    block_of, full_ids = source["block"], source["input_ids"]
    blocks: dict[int, list[int]] = {}
    for i, block in enumerate(block_of):
        if block >= 0:
            blocks.setdefault(block, []).append(i)
    ordered = [blocks[b] for b in sorted(blocks)]
    longest = max((sum(len(full_ids[i]) for i in block) for block in ordered), default=0)
    if longest <= max_length:
        return rows, ordered
    log.info("%s: blocks of up to %d tokens packed again at max_length %d", name, longest, max_length)
    pieces = [_as_list(full_ids[i]) for block in ordered for i in block]
    kept = [row for row, block in zip(rows, block_of, strict=True) if block < 0]
    repacked = pack(pieces, max_length)
    new_blocks, start = [], len(kept)
    for block in repacked:
        new_blocks.append(list(range(start, start + len(block))))
        start += len(block)
    kept += [{"input_ids": piece, "labels": list(piece)} for block in repacked for piece in block]
    return kept, new_blocks


def _example(item: Any, index: int, name: str, max_length: int) -> Example:
    if not hasattr(item, "keys") or "input_ids" not in item:
        raise DatasetError(f"{name} dataset row {index}: expected a mapping with input_ids (and labels)")
    input_ids = _as_list(item["input_ids"])[:max_length]
    labels = _as_list(item["labels"])[:max_length] if item.get("labels") is not None else list(input_ids)
    if len(labels) != len(input_ids):
        raise DatasetError(f"{name} dataset row {index}: {len(input_ids)} input_ids but {len(labels)} labels")
    return {"input_ids": input_ids, "labels": labels}


def _as_list(values: Any) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def check_trainable(examples: Examples) -> None:
    """Clear errors for data that cannot train anything."""
    if not examples.rows:
        raise DatasetError(f"the {examples.name} dataset is empty")
    if examples.trained_tokens == 0:
        raise DatasetError(
            f"the {examples.name} dataset has no trained tokens: every label is -100 "
            "(check the response template / loss masking of `aift prepare`, or use `aift preview`)"
        )


@dataclass
class BatchPlanner:
    """Cuts one epoch into micro-batches (packed rows or length-grouped padded batches) and collates them."""

    examples: Examples
    batch_size: int
    max_length: int
    packing: bool
    pad_token_id: int
    seed: int
    mask: str = "4d"

    def __post_init__(self) -> None:
        lengths = [len(ex["input_ids"]) for ex in self.examples.rows]
        self._lengths = lengths
        # Packing into rows is deterministic; only the order of rows changes between epochs.
        self._rows = self._packed_rows(lengths) if self.packing else None
        if self.packing:
            self._collate = PackedCollator(self.pad_token_id, self.max_length, mask=self.mask)
        else:
            self._collate = PaddedCollator(self.pad_token_id)

    def _packed_rows(self, lengths: list[int]) -> list[list[int]]:
        """The blocks `aift prepare` packed (pretrain), then the other examples packed best-fit decreasing."""
        blocks = self.examples.blocks or []
        in_blocks = {i for block in blocks for i in block}
        rest = [i for i in range(len(lengths)) if i not in in_blocks]
        packed = best_fit_decreasing([lengths[i] for i in rest], self.max_length)
        return [*blocks, *[[rest[k] for k in row] for row in packed]]

    @property
    def efficiency(self) -> float:
        """Real tokens over slots of the packed rows (1.0 without packing: padding is per batch)."""
        return packing_efficiency(self._lengths, self._rows, self.max_length) if self.packing else 1.0

    def epoch(self, epoch: int) -> list[list]:
        """The micro-batches of one epoch, in training order (the same for the same seed and epoch)."""
        if not self.packing:
            return length_grouped_batches(self._lengths, self.batch_size, seed=self.seed + epoch)
        rows = list(self._rows)
        random.Random(self.seed + epoch).shuffle(rows)
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def num_micro_batches(self) -> int:
        n = len(self._rows) if self.packing else len(self._lengths)
        return math.ceil(n / self.batch_size)

    def collate(self, micro_batch: list) -> dict:
        rows = self.examples.rows
        if self.packing:
            return self._collate([[rows[i] for i in row] for row in micro_batch])
        return self._collate([rows[i] for i in micro_batch])


def eval_batches(examples: Examples, batch_size: int, pad_token_id: int, rank: int = 0, world: int = 1):
    """Padded batches of this process's share of the eval split, in a fixed order (never packed)."""
    collate = PaddedCollator(pad_token_id)
    order = sorted(range(len(examples.rows)), key=lambda i: -len(examples.rows[i]["input_ids"]))
    starts = range(0, len(order), batch_size)
    for k, start in enumerate(starts):
        if k % world == rank:
            yield collate([examples.rows[i] for i in order[start : start + batch_size]])
