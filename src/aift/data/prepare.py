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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aift.data import DataError
from aift.data.conversation import PromptFormat, Rendered
from aift.data.formats import default_system, resolve_format
from aift.data.masking import encode_batch
from aift.data.packing import best_fit_decreasing, packing_efficiency
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

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """One batch of rows; a dropped row keeps its place (empty columns, its reason in ``drop``)."""
        conversations = [_with_system(self.conversations[row], self.system) for row in batch["row"]]
        rendered = [
            r if isinstance(r, Rendered) else f"cannot render: {r}"
            for r in self.fmt.render_many(conversations, self.tokenizer)
        ]
        ok = [r for r in rendered if isinstance(r, Rendered)]
        encoded = iter(encode_batch(ok, self.tokenizer, self.max_length, self.train_on_prompt) if ok else [])
        out: dict[str, list] = {c: [] for c in _features(with_bookkeeping=True)}
        for r in rendered:
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
        return out


def _features(with_bookkeeping: bool):
    """The prepared dataset's columns and types; with the map's own bookkeeping (drop reason, truncation, ...)."""
    from datasets import Features, List, Value

    columns = {
        "input_ids": List(Value("int32")),
        "attention_mask": List(Value("int8")),
        "labels": List(Value("int32")),
        "text": Value("string"),
        "prompt": Value("string"),
        "reference": Value("string"),
    }
    if with_bookkeeping:
        columns.update(truncated=Value("string"), drop=Value("string"), trained=Value("int32"))
    return Features(columns)


@dataclass
class EncodedRows:
    """Every row rendered and tokenized (an Arrow dataset, dropped rows included), and what was kept of it."""

    rows: Any  # datasets.Dataset with the columns of _features(with_bookkeeping=True), one row per input row
    kept: list[int]  # indices of the usable rows, in input order
    lengths: list[int]  # tokens of each kept row
    trained: int  # trained tokens over the kept rows
    dropped: Counter
    truncated: Counter

    def select(self, indices: list[int]):
        """The given rows with the prepared dataset's columns, still in Arrow (nothing goes through Python)."""
        return self.rows.select(indices).select_columns(list(_features(with_bookkeeping=False)))


def _encode_all(
    loaded: Loaded,
    fmt: PromptFormat,
    tokenizer,
    max_length: int,
    train_on_prompt: bool,
    system: str | None,
    num_proc: int | None = None,
) -> EncodedRows:
    """Rendered and tokenized rows, the usable ones, their lengths, drop reasons and truncation counts.

    One batched ``datasets.map`` over ``num_proc`` processes (default: every core); shards are contiguous, so
    the result is the same for any ``num_proc``. The map shows its progress bar. The token columns stay in
    Arrow from the map to the disk: only the bookkeeping columns are read back into Python.
    """
    import pyarrow.compute as pc
    from datasets import Dataset

    rows = len(loaded.conversations)
    if num_proc is None:  # every core, but no worker for fewer than _MIN_ROWS_PER_PROC rows
        num_proc = min(os.cpu_count() or 1, rows // _MIN_ROWS_PER_PROC or 1)
    procs = max(1, min(num_proc, rows))
    features = _features(with_bookkeeping=True)
    mapped = Dataset.from_dict({"row": list(range(rows))}).map(
        _EncodeRows(loaded.conversations, fmt, tokenizer, max_length, train_on_prompt, system),
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
            _note_dropped(loaded, where, reason)
            continue
        if kind := kinds[i]:
            truncated[kind] += 1
        kept.append(i)
    return EncodedRows(
        rows=mapped,
        kept=kept,
        lengths=[lengths[i] for i in kept],
        trained=sum(trained[i] for i in kept),
        dropped=dropped,
        truncated=truncated,
    )


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


def _split(kept: list[int], val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) of the kept rows: a seeded shuffle, the first ``val_ratio`` of it for test."""
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * val_ratio)
    if val_ratio > 0 and len(order) >= 2:
        n_test = min(max(1, n_test), len(order) - 1)
    return [kept[i] for i in order[n_test:]], [kept[i] for i in order[:n_test]]


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
    encoded = _encode_all(loaded, fmt, tokenizer, max_length, train_on_prompt, system, num_proc)
    dropped, truncated, lengths = encoded.dropped, encoded.truncated, encoded.lengths
    dropped.update(loaded.dropped)
    n_dropped = sum(dropped.values())
    _check_enough_kept(loaded, len(encoded.kept), dropped, str(source_path or source))
    end_markers = sorted({fmt.end_of_turn(tokenizer, last=True), fmt.end_of_turn(tokenizer, last=False)})
    if not any(m.strip() for m in end_markers):
        log.warning(
            "warning: format %s puts no end-of-turn marker after answers: the model may not learn to stop", fmt.name
        )
    train, test = _split(encoded.kept, val_ratio, seed)
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
            "kept": len(encoded.kept),
            "dropped": n_dropped,
            "dropped_reasons": dict(dropped),
            "truncated": {"prompt": truncated["prompt"], "answer": truncated["answer"]},
            "train": len(train),
            "test": len(test),
        },
        "tokens": {
            "length": _length_stats(lengths),
            "total": sum(lengths),
            "trained": encoded.trained,
            "packing_efficiency": round(
                packing_efficiency(lengths, best_fit_decreasing(lengths, max_length), max_length), 4
            ),
        },
        "aift_version": __version__,
    }
    out = Path(output_dir) if output_dir else default_output_dir(source, model, num_samples)
    from datasets import DatasetDict

    write_prepared(out, DatasetDict({"train": encoded.select(train), "test": encoded.select(test)}), info)
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
