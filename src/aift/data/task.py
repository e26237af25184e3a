"""What a task of `aift prepare` gives the one pipeline in aift.data.prepare: its shapes, its sources and its encoder.

The pipeline reads rows, detects their shape in the task's ``ShapeTable``, converts them into the task's
examples, and hands those to the task's ``encode``, which tokenizes and masks them. Splitting, prepare.json
and the atomic write are the pipeline's, the same for every task.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aift.data.conversation import PromptFormat
from aift.data.shapes import Loaded, ShapeTable


@dataclass(frozen=True)
class EncodeOptions:
    """What encoding needs besides the examples: the tokenizer, the format and the options of `aift prepare`."""

    model: str
    tokenizer: Any
    fmt: PromptFormat
    system: str | None  # the system prompt given to examples without one (--system, else the model card's)
    requested_system: str | None  # --system as the user passed it
    max_length: int
    train_on_prompt: bool = False
    num_proc: int | None = None
    min_doc_tokens: int = 0  # pretrain: documents with fewer tokens are dropped
    text_column: str = "text"  # pretrain: the column of JSONL/CSV/Parquet rows that holds a document
    drop_earlier_thinking: bool = False  # reasoning only in the answers after the last user message


class Encoded(Protocol):
    """A task's examples tokenized and masked: what was kept, dropped and truncated, and the splits to write."""

    kept: int  # usable examples; the split picks positions 0..kept-1
    dropped: Counter  # reason -> rows dropped while encoding
    truncated: Counter  # "prompt" / "answer" -> examples cut to max_length
    noun: str  # "examples", "pairs": what the log line counts

    def info(self) -> dict:
        """The task's own prepare.json fields (``end_of_turn``, ``system``, ``tokens``, ...); after ``dataset``."""

    def dataset(self, train: list[int], test: list[int]) -> Any:
        """The train/test DatasetDict of the kept examples at these positions."""


@dataclass(frozen=True)
class Task:
    """One `aift prepare --task`: a shape table, the sources it reads and how its examples are encoded."""

    name: str
    summary: str  # one line for `aift prepare --help`
    shapes: ShapeTable
    sources: tuple[str, ...]
    encode: Callable[[Loaded, EncodeOptions], Encoded]
    output_name: Callable[[str, str | Path | None, str, int | None], str]  # (source, path, model, num_samples)
    train_on_prompt: bool = False  # whether --train-on-prompt applies (a preference pair trains its answers only)
    # Reads the source itself, (source, path, num_samples, strict, options) -> (source name, Loaded), instead of
    # aift.data.sources.load_rows with the task's shapes (pretrain: text files, folders, globs).
    read: Callable[..., tuple[str, Loaded]] | None = None
    filters: tuple[str, ...] = ()  # drop reasons that are the user's filters: not counted as unusable rows
    thinking: bool = False  # whether --drop-earlier-thinking applies (conversations with reasoning traces)
