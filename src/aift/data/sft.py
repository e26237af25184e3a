"""The SFT task: conversations -> rendered text -> token ids with answer-only labels, tokenized in parallel.

`aift prepare --task sft` (the default). Rows are read and turned into conversations by aift.data.sources
(its ``SFT_SHAPES``); here each conversation is rendered in the prompt format, tokenized and masked in one
batched ``datasets.map``, and prepare.json gets token-length statistics and the packing efficiency.

Rows of a chat shape (``CHAT_SHAPES``: messages, ShareGPT conversations) also keep their prompt's messages,
everything before the last assistant turn, as JSON in a ``prompt_messages`` column: GRPO reads a folder with it
as conversational data (TRL's rule), so its rewards get message lists. The other shapes do not have the column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aift.data.conversation import Rendered
from aift.data.masking import encode_batch
from aift.data.packing import best_fit_decreasing, packing_efficiency
from aift.data.reasoning import drop_earlier_thinking
from aift.data.shapes import Loaded
from aift.data.task import EncodeOptions

log = logging.getLogger(__name__)
CHAT_SHAPES = ("openai_tools", "sharegpt_tools", "messages", "sharegpt")  # rows that are conversations
PROMPT_MESSAGES = "prompt_messages"  # the column of their prompt's messages (JSON)
_MIN_ROWS_PER_PROC = 256  # below this a worker process costs more than it saves


def output_name(source: str, source_path: str | Path | None, model: str, num_samples: int | None) -> str:
    """``{source}_{model basename}_{num_samples or all}``, the folder under datasets/."""
    return f"{source}_{Path(str(model).rstrip('/')).name}_{num_samples or 'all'}"


def _with_system(conversation: list[dict], system: str | None) -> list[dict]:
    if not system or (conversation[0]["role"] == "system" and conversation[0]["content"]):
        return conversation
    if conversation[0]["role"] == "system":  # one that only declares tools
        return [{**conversation[0], "content": system}, *conversation[1:]]
    return [{"role": "system", "content": system}, *conversation]


class _EncodeRows:
    """The batched map function: row indices -> rendered, tokenized, masked columns (one per worker process)."""

    def __init__(self, conversations: list[list[dict]], options: EncodeOptions, keep_messages: bool):
        self.conversations, self.fmt, self.tokenizer = conversations, options.fmt, options.tokenizer
        self.keep_messages = keep_messages
        self.max_length, self.train_on_prompt, self.system = options.max_length, options.train_on_prompt, options.system
        self.drop_earlier_thinking = options.drop_earlier_thinking

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """One batch of rows; a dropped row keeps its place (empty columns, its reason in ``drop``)."""
        conversations = [self.conversations[row] for row in batch["row"]]
        if self.drop_earlier_thinking:
            conversations = [drop_earlier_thinking(c) for c in conversations]
        # The prompt's messages as the source had them (the system prompt that prepare adds is in `prompt` only).
        prompts = [json.dumps(c[:-1], ensure_ascii=False) if self.keep_messages else "" for c in conversations]
        conversations = [_with_system(c, self.system) for c in conversations]
        rendered = [
            r if isinstance(r, Rendered) else f"cannot render: {r}"
            for r in self.fmt.render_many(conversations, self.tokenizer)
        ]
        ok = [r for r in rendered if isinstance(r, Rendered)]
        encoded = iter(encode_batch(ok, self.tokenizer, self.max_length, self.train_on_prompt) if ok else [])
        out: dict[str, list] = {c: [] for c in _features(with_bookkeeping=True, with_messages=self.keep_messages)}
        for r, messages in zip(rendered, prompts, strict=True):
            e = next(encoded) if isinstance(r, Rendered) else None
            trained = e.num_trained if e else 0
            drop = r if e is None else ("no trained token" if trained == 0 else "")
            ids = e.input_ids if e and not drop else []
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(e.labels if e and not drop else [])
            out["text"].append(e.text if e and not drop else "")
            out["prompt"].append(r.prompt if e and not drop else "")
            out["reference"].append(r.reference if e and not drop else "")
            out["truncated"].append((e.truncated or "") if e and not drop else "")
            out["drop"].append(drop)
            out["trained"].append(trained if not drop else 0)
            if self.keep_messages:
                out[PROMPT_MESSAGES].append(messages if not drop else "")
        return out


def _features(with_bookkeeping: bool, with_messages: bool = False):
    """The prepared dataset's columns and types; with the map's own bookkeeping (drop reason, truncation, ...)
    and, for a chat shape, the prompt's messages."""
    from datasets import Features, List, Value

    columns = {
        "input_ids": List(Value("int32")),
        "attention_mask": List(Value("int8")),
        "labels": List(Value("int32")),
        "text": Value("string"),
        "prompt": Value("string"),
        "reference": Value("string"),
    }
    if with_messages:
        columns[PROMPT_MESSAGES] = Value("string")
    if with_bookkeeping:
        columns.update(truncated=Value("string"), drop=Value("string"), trained=Value("int32"))
    return Features(columns)


@dataclass
class EncodedRows:
    """Every row rendered and tokenized (an Arrow dataset, dropped rows included), and what was kept of it."""

    rows: Any  # datasets.Dataset with the columns of _features(with_bookkeeping=True), one row per input row
    kept_rows: list[int]  # indices of the usable rows, in input order
    lengths: list[int]  # tokens of each kept row
    trained: int  # trained tokens over the kept rows
    dropped: Counter
    truncated: Counter
    options: EncodeOptions
    with_messages: bool = False  # a chat shape: the prompt_messages column
    noun = "examples"

    @property
    def kept(self) -> int:
        return len(self.kept_rows)

    def dataset(self, train: list[int], test: list[int]):
        """The splits with the prepared dataset's columns, still in Arrow (nothing goes through Python)."""
        from datasets import DatasetDict

        return DatasetDict({"train": self._select(train), "test": self._select(test)})

    def _select(self, positions: list[int]):
        columns = list(_features(with_bookkeeping=False, with_messages=self.with_messages))
        return self.rows.select([self.kept_rows[i] for i in positions]).select_columns(columns)

    def info(self) -> dict:
        fmt, tokenizer, lengths = self.options.fmt, self.options.tokenizer, self.lengths
        end_markers = sorted({fmt.end_of_turn(tokenizer, last=True), fmt.end_of_turn(tokenizer, last=False)})
        if not any(m.strip() for m in end_markers):
            log.warning(
                "warning: format %s puts no end-of-turn marker after answers: the model may not learn to stop",
                fmt.name,
            )
        efficiency = packing_efficiency(
            lengths, best_fit_decreasing(lengths, self.options.max_length), self.options.max_length
        )
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "end_of_turn": end_markers,
            "chat_template_sha256": _template_sha(tokenizer),
            "system": self.options.system,
            "train_on_prompt": self.options.train_on_prompt,
            "drop_earlier_thinking": self.options.drop_earlier_thinking,
            "tokens": {
                "length": _length_stats(lengths),
                "total": sum(lengths),
                "trained": self.trained,
                "packing_efficiency": round(efficiency, 4),
            },
        }


def encode(loaded: Loaded, options: EncodeOptions) -> EncodedRows:
    """Rendered and tokenized rows, the usable ones, their lengths, drop reasons and truncation counts.

    One batched ``datasets.map`` over ``num_proc`` processes (default: every core); shards are contiguous, so
    the result is the same for any ``num_proc``. The map shows its progress bar. The token columns stay in
    Arrow from the map to the disk: only the bookkeeping columns are read back into Python.
    """
    import pyarrow.compute as pc
    from datasets import Dataset

    rows, num_proc = len(loaded.examples), options.num_proc
    if num_proc is None:  # every core, but no worker for fewer than _MIN_ROWS_PER_PROC rows
        num_proc = min(os.cpu_count() or 1, rows // _MIN_ROWS_PER_PROC or 1)
    procs = max(1, min(num_proc, rows))
    keep_messages = loaded.shape in CHAT_SHAPES
    features = _features(with_bookkeeping=True, with_messages=keep_messages)
    mapped = Dataset.from_dict({"row": list(range(rows))}).map(
        _EncodeRows(loaded.examples, options, keep_messages),
        batched=True,
        batch_size=256,
        num_proc=procs if procs > 1 else None,
        remove_columns=["row"],
        features=features,
        new_fingerprint=uuid.uuid4().hex,  # hashing the function (it holds every row) would cost more than it saves
        desc="tokenizing",
    )
    if not rows:  # map never calls the function on no rows, so it leaves no columns either
        mapped = Dataset.from_dict({c: [] for c in features}, features=features)
    drops, kinds, trained = (mapped.data.column(c).to_pylist() for c in ("drop", "truncated", "trained"))
    lengths = pc.list_value_length(mapped.data.column("input_ids")).to_pylist()  # counted in Arrow
    kept, dropped, truncated = [], Counter(), Counter()
    for i, where in enumerate(loaded.wheres):
        if reason := drops[i]:
            if reason.startswith("cannot render"):
                log.warning("%s dropped: %s", where, reason.removeprefix("cannot render: "))
            dropped[reason] += 1
            loaded.note_first_dropped(where, reason)
            continue
        if kind := kinds[i]:
            truncated[kind] += 1
        kept.append(i)
    return EncodedRows(
        rows=mapped,
        kept_rows=kept,
        lengths=[lengths[i] for i in kept],
        trained=sum(trained[i] for i in kept),
        dropped=dropped,
        truncated=truncated,
        options=options,
        with_messages=keep_messages,
    )


def _length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def _template_sha(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None
