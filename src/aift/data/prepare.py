"""`prepare_dataset`: a source -> a tokenized, loss-masked DatasetDict (train/test) on disk, with prepare.json.

The folder is built in a temp dir beside the target and renamed at the end, so a failure leaves nothing
half-written. prepare.json records what was read, kept, dropped (with reasons) and truncated, token-length
statistics and the packing efficiency at ``max_length``, and the prompt format that train/eval/generate reuse.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import statistics
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aift.data import DataError
from aift.data.formats import PromptFormat, Rendered, default_system, resolve_format
from aift.data.masking import encode_batch
from aift.data.packing import best_fit_decreasing, count_trained_tokens, packing_efficiency
from aift.data.prepared import write_prepared
from aift.data.sources import SOURCES, Loaded, load_conversations, source_for_path
from aift.models.registry import EMBEDDED_MODEL

log = logging.getLogger(__name__)
_MIN_ROWS_PER_PROC = 256  # below this a worker process costs more than it saves


def default_output_dir(source: str, model: str, num_samples: int | None) -> Path:
    """``datasets/{source}_{model basename}_{num_samples or all}``."""
    return Path("datasets") / f"{source}_{Path(str(model).rstrip('/')).name}_{num_samples or 'all'}"


def _check_options(
    source: str | None, max_length: int, val_ratio: float, num_samples: int | None, num_proc: int | None = None
) -> None:
    if source is not None and source not in SOURCES:
        raise DataError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if max_length < 8:
        raise DataError(f"--max-length must be at least 8 tokens, got {max_length}")
    if not 0 <= val_ratio < 1:
        raise DataError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"--num-samples must be positive, got {num_samples}")
    if num_proc is not None and num_proc < 1:
        raise DataError(f"--num-proc must be positive, got {num_proc}")


def _with_system(conversation: list[dict], system: str | None) -> list[dict]:
    if not system or conversation[0]["role"] == "system":
        return conversation
    return [{"role": "system", "content": system}, *conversation]


class _EncodeRows:
    """The batched map function: row indices -> rendered, tokenized, masked columns (one per worker process)."""

    def __init__(self, conversations, fmt: PromptFormat, tokenizer, max_length: int, train_on_prompt: bool, system):
        self.conversations, self.fmt, self.tokenizer = conversations, fmt, tokenizer
        self.max_length, self.train_on_prompt, self.system = max_length, train_on_prompt, system

    def _render(self, row: int) -> Rendered | str:
        try:
            return self.fmt.render(_with_system(self.conversations[row], self.system), self.tokenizer)
        except DataError as e:
            return f"cannot render: {e}"

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rendered = [self._render(row) for row in batch["row"]]
        ok = [r for r in rendered if isinstance(r, Rendered)]
        encoded = iter(encode_batch(ok, self.tokenizer, self.max_length, self.train_on_prompt) if ok else [])
        out: dict[str, list] = {c: [] for c in _COLUMNS}
        for r in rendered:
            e = next(encoded) if isinstance(r, Rendered) else None
            drop = r if e is None else ("no trained token" if e.num_trained == 0 else "")
            ids = e.input_ids if e and not drop else []
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(e.labels if e and not drop else [])
            out["text"].append(e.text if e and not drop else "")
            out["prompt"].append(r.prompt if e and not drop else "")
            out["reference"].append(r.reference if e and not drop else "")
            out["truncated"].append((e.truncated or "") if e and not drop else "")
            out["drop"].append(drop)
        return out


_COLUMNS = ("input_ids", "attention_mask", "labels", "text", "prompt", "reference", "truncated", "drop")


def _encode_all(
    loaded: Loaded,
    fmt: PromptFormat,
    tokenizer,
    max_length: int,
    train_on_prompt: bool,
    system: str | None,
    num_proc: int | None = None,
) -> tuple[list[dict[str, Any]], Counter, Counter]:
    """Rendered and tokenized examples, plus drop reasons and truncation counts.

    One batched ``datasets.map`` over ``num_proc`` processes (default: every core); shards are contiguous, so
    the result is the same for any ``num_proc``. The map shows its progress bar.
    """
    from datasets import Dataset

    rows = len(loaded.conversations)
    if num_proc is None:  # every core, but no worker for fewer than _MIN_ROWS_PER_PROC rows
        num_proc = min(os.cpu_count() or 1, rows // _MIN_ROWS_PER_PROC or 1)
    procs = max(1, min(num_proc, rows))
    mapped = Dataset.from_dict({"row": list(range(rows))}).map(
        _EncodeRows(loaded.conversations, fmt, tokenizer, max_length, train_on_prompt, system),
        batched=True,
        batch_size=256,
        num_proc=procs if procs > 1 else None,
        remove_columns=["row"],
        new_fingerprint=uuid.uuid4().hex,  # hashing the function (it holds every row) would cost more than it saves
        desc="tokenizing",
    )
    columns = mapped.to_dict()
    examples, dropped, truncated = [], Counter(), Counter()
    for i, where in enumerate(loaded.wheres):
        if reason := columns["drop"][i]:
            if reason.startswith("cannot render"):
                log.warning("%s dropped: %s", where, reason.removeprefix("cannot render: "))
            dropped[reason] += 1
            _note_dropped(loaded, where, reason)
            continue
        if kind := columns["truncated"][i]:
            truncated[kind] += 1
        examples.append({c: columns[c][i] for c in _COLUMNS[:6]})
    return examples, dropped, truncated


def _note_dropped(loaded: Loaded, where: str, reason: str) -> None:
    if len(loaded.first_dropped) < 3:
        loaded.first_dropped.append(f"{where}: {reason}")


def _check_enough_kept(loaded: Loaded, kept: int, dropped: Counter, origin: str) -> None:
    """Fails, naming the file and its first dropped rows, when nothing or less than half the rows is usable."""
    n_dropped = sum(dropped.values())
    if kept and n_dropped <= loaded.read / 2:
        return
    reasons = ", ".join(f"{n} {why}" for why, n in dropped.most_common())
    first = f" First dropped: {'; '.join(loaded.first_dropped)}." if loaded.first_dropped else ""
    raise DataError(
        f"{origin}: {n_dropped} of {loaded.read} rows were dropped ({reasons}); nothing was written.{first}"
    )


def _split(examples: list[dict], val_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * val_ratio)
    if val_ratio > 0 and len(order) >= 2:
        n_test = min(max(1, n_test), len(order) - 1)
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


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


def _to_dataset_dict(splits: dict[str, list[dict]]):
    from datasets import Dataset, DatasetDict, Features, List, Value

    features = Features(
        {
            "input_ids": List(Value("int32")),
            "attention_mask": List(Value("int8")),
            "labels": List(Value("int32")),
            "text": Value("string"),
            "prompt": Value("string"),
            "reference": Value("string"),
        }
    )
    columns = list(features)
    return DatasetDict(
        {
            name: Dataset.from_dict({c: [e[c] for e in rows] for c in columns}, features=features)
            for name, rows in splits.items()
        }
    )


def prepare_dataset(
    model: str = EMBEDDED_MODEL,
    source: str | None = "json",
    source_path: str | Path | None = None,
    num_samples: int | None = None,
    format: str = "auto",
    output_dir: str | Path | None = None,
    max_length: int = 2048,
    val_ratio: float = 0.05,
    seed: int = 42,
    train_on_prompt: bool = False,
    system: str | None = None,
    strict: bool = False,
    trust_remote_code: bool = False,
    num_proc: int | None = None,
) -> Path:
    """Turns raw data into a tokenized, loss-masked train/test DatasetDict on disk.

    Args:
        model: Registered name, hub id or folder; gives the tokenizer and the default format.
        source: alpaca, dolly, wizardlm (hub), json, jsonl, csv, parquet (files), or None to infer it
            from ``source_path``.
        source_path: The local file (for hub sources: a local copy in the hub's schema).
        num_samples: Use only the first N rows.
        format: ``auto`` or a name from ``aift.data.formats.FORMATS``.
        output_dir: Default ``datasets/{source}_{model basename}_{num_samples or all}``.
        max_length: Examples are cut to this many tokens (prompt side first).
        val_ratio: Share of examples in the test split.
        seed: Seed of the train/test shuffle.
        train_on_prompt: Train on every token, not only the answers.
        system: System prompt for conversations without one (default: the model card's, if any).
        strict: Fail on the first unusable row instead of dropping it.
        trust_remote_code: Allow tokenizers that run code from their hub repository.
        num_proc: Worker processes for tokenizing (default ``os.cpu_count()``; small files use fewer).

    Returns:
        The output folder.
    """
    from aift import __version__
    from aift.models.loading import load_tokenizer

    _check_options(source, max_length, val_ratio, num_samples, num_proc)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    fmt = resolve_format(model, tokenizer, format)
    system = system or default_system(model)
    loaded = load_conversations(source, source_path, num_samples, strict)
    source = source or source_for_path(source_path)
    examples, dropped, truncated = _encode_all(loaded, fmt, tokenizer, max_length, train_on_prompt, system, num_proc)
    dropped.update(loaded.dropped)
    n_dropped = sum(dropped.values())
    _check_enough_kept(loaded, len(examples), dropped, str(source_path or source))
    end_markers = sorted({fmt.end_of_turn(tokenizer, last=True), fmt.end_of_turn(tokenizer, last=False)})
    if not any(m.strip() for m in end_markers):
        log.warning(
            "warning: format %s puts no end-of-turn marker after answers: the model may not learn to stop", fmt.name
        )
    train, test = _split(examples, val_ratio, seed)
    lengths = [len(e["input_ids"]) for e in examples]
    info = {
        "source": source,
        "source_path": str(source_path) if source_path else None,
        "shape": loaded.shape,
        "model": str(model),
        "tokenizer": str(model),
        "tokenizer_class": type(tokenizer).__name__,
        "format": fmt.name,
        "prompt_format": fmt.name,
        "end_of_turn": end_markers,
        "chat_template_sha256": _template_sha(tokenizer),
        "system": system,
        "max_length": max_length,
        "train_on_prompt": train_on_prompt,
        "val_ratio": val_ratio,
        "seed": seed,
        "num_samples": num_samples,
        "counts": {
            "available": loaded.total_available,
            "read": loaded.read,
            "kept": len(examples),
            "dropped": n_dropped,
            "dropped_reasons": dict(dropped),
            "truncated": {"prompt": truncated["prompt"], "answer": truncated["answer"]},
            "train": len(train),
            "test": len(test),
        },
        "tokens": {
            "length": _length_stats(lengths),
            "total": sum(lengths),
            "trained": sum(count_trained_tokens(e["labels"]) for e in examples),
            "packing_efficiency": round(
                packing_efficiency(lengths, best_fit_decreasing(lengths, max_length), max_length), 4
            ),
        },
        "aift_version": __version__,
    }
    out = Path(output_dir) if output_dir else default_output_dir(source, model, num_samples)
    write_prepared(out, _to_dataset_dict({"train": train, "test": test}), info)
    log.info(
        "prepared %s: %d train / %d test examples (%d read, %d dropped, %d truncated), format %s",
        out,
        len(train),
        len(test),
        loaded.read,
        n_dropped,
        sum(truncated.values()),
        fmt.name,
    )
    return out
