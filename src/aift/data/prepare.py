"""`aift prepare`: a source -> a tokenized, loss-masked DatasetDict (train/test) on disk, with prepare.json.

One pipeline for every task in ``TASKS``: read rows -> detect their shape in the task's shape table -> rows
to the task's examples -> tokenize and mask (the task's ``encode``) -> seeded train/test split ->
prepare.json -> atomic write. A new kind of data is a new task entry (or a new shape in a task's table).

The folder is built in a temp dir beside the target and renamed at the end, so a failure leaves nothing
half-written. prepare.json records what was read, kept, dropped (with reasons) and truncated, and the prompt
format that train/eval/generate reuse; each task adds its own fields (SFT: token-length statistics and the
packing efficiency at ``max_length``).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

from aift.data import DataError, preference, pretrain, sft
from aift.data.formats import default_system, resolve_format
from aift.data.prepared import write_prepared
from aift.data.shapes import Loaded
from aift.data.sources import FILE_SOURCES, SFT_SHAPES, SOURCES, load_rows, source_for_path
from aift.data.task import Encoded, EncodeOptions, Task
from aift.data.text_sources import TEXT_SOURCES, text_table
from aift.models.registry import EMBEDDED_MODEL

log = logging.getLogger(__name__)

TASKS: dict[str, Task] = {
    "sft": Task(
        name="sft",
        summary="conversations, instruction/answer rows",
        shapes=SFT_SHAPES,
        sources=SOURCES,
        encode=sft.encode,
        output_name=sft.output_name,
        train_on_prompt=True,
        thinking=True,
    ),
    "preference": Task(
        name="preference",
        summary="chosen/rejected pairs, or KTO rows with a label",
        shapes=preference.PREFERENCE_SHAPES,
        sources=FILE_SOURCES,
        encode=preference.encode_samples,
        output_name=preference.output_name,
    ),
    "pretrain": Task(
        name="pretrain",
        summary="raw text (.txt/.md files, folders, globs; rows with a text column) packed into blocks",
        shapes=text_table(),
        sources=TEXT_SOURCES,
        encode=pretrain.encode,
        output_name=pretrain.output_name,
        read=pretrain.read,
        filters=pretrain.FILTERS,
    ),
}

# prepare.json's keys in the order the file shows them; a task writes those it has.
_INFO_ORDER = (
    "task", "source", "source_path", "shape", "model", "tokenizer", "tokenizer_class", "format", "prompt_format",
    "end_of_turn", "chat_template_sha256", "system", "max_length", "train_on_prompt", "drop_earlier_thinking",
    "val_ratio", "seed",
    "num_samples", "counts", "tokens", "aift_version",
    "text_column", "min_doc_tokens", "documents", "blocks",
)  # fmt: skip


def check_options(
    task: Task,
    source: str | None,
    source_path: str | Path | None,
    max_length: int,
    val_ratio: float,
    num_samples: int | None,
    num_proc: int | None = None,
    train_on_prompt: bool = False,
    pretrain_options: dict | None = None,
    drop_earlier_thinking: bool = False,
) -> None:
    """DataError naming the option when one of `aift prepare`'s options cannot be used by the task."""
    for flag, value in (pretrain_options or {}).items():
        if value is not None and task.name != "pretrain":
            raise DataError(f"--{flag} applies to --task pretrain only")
    if train_on_prompt and not task.train_on_prompt:
        raise DataError(f"--task {task.name} trains on the answers only: --train-on-prompt does not apply")
    if drop_earlier_thinking and not task.thinking:
        raise DataError(f"--task {task.name} has no conversations: --drop-earlier-thinking does not apply")
    if source is not None and source not in task.sources:
        raise DataError(f"unknown source {source!r}; valid sources: {', '.join(task.sources)}")
    if source_path is None and set(task.sources) <= set(FILE_SOURCES):
        raise DataError(f"--task {task.name} needs --source-path FILE ({', '.join(task.sources)})")
    if max_length < 8:
        raise DataError(f"--max-length must be at least 8 tokens, got {max_length}")
    if not 0 <= val_ratio < 1:
        raise DataError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"--num-samples must be positive, got {num_samples}")
    if num_proc is not None and num_proc < 1:
        raise DataError(f"--num-proc must be positive, got {num_proc}")


def split(n: int, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) positions of ``n`` examples: a seeded shuffle, the first ``val_ratio`` of it for test.

    With ``val_ratio > 0`` and at least 2 examples the test split has at least one and train keeps at least
    one; a single example always goes to train (a train split with no rows cannot be trained on).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(max(1, round(n * val_ratio)), n - 1) if val_ratio > 0 and n >= 2 else 0
    return order[n_test:], order[:n_test]


def _check_enough_kept(loaded: Loaded, kept: int, dropped: Counter, origin: str, filters: tuple = ()) -> None:
    """Fails, naming the file and its first dropped rows, when nothing or less than half the rows is usable.

    Rows dropped by the user's own filters (``filters``: pretrain's duplicates and short documents) are not
    unusable: they count only when nothing is left.
    """
    n_dropped = sum(n for why, n in dropped.items() if why not in filters)
    if kept and n_dropped <= loaded.read / 2:
        return
    reasons = ", ".join(f"{n} {why}" for why, n in dropped.most_common())
    first = f" First dropped: {'; '.join(loaded.first_dropped)}." if loaded.first_dropped else ""
    raise DataError(
        f"{origin}: {sum(dropped.values())} of {loaded.read} rows were dropped ({reasons}); nothing was written.{first}"
    )


def _prepare_json(loaded: Loaded, encoded: Encoded, dropped: Counter, n_train: int, n_test: int) -> dict:
    """The shape, the counts and the task's own fields of prepare.json (the caller adds the options)."""
    from aift import __version__

    truncated = encoded.truncated
    counts = {
        "available": loaded.total_available,
        "read": loaded.read,
        "kept": encoded.kept,
        "dropped": sum(dropped.values()),
        "dropped_reasons": dict(dropped),
        "truncated": {"prompt": truncated["prompt"], "answer": truncated["answer"]},
        "train": n_train,
        "test": n_test,
    }
    return {"shape": loaded.shape, "counts": counts, "aift_version": __version__, **encoded.info()}


def prepare(
    task: str,
    model: str = EMBEDDED_MODEL,
    source: str | None = None,
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
    min_doc_tokens: int | None = None,
    text_column: str | None = None,
    drop_earlier_thinking: bool = False,
) -> Path:
    """The pipeline of every task: see `prepare_dataset` for the arguments; ``task`` is a name in ``TASKS``.

    pretrain only: ``min_doc_tokens`` drops shorter documents; ``text_column`` names the column of a document.
    """
    from aift.models.loading import load_tokenizer

    spec = TASKS[task]
    pretrain_options = {"min-doc-tokens": min_doc_tokens, "text-column": text_column}
    check_options(
        spec,
        source,
        source_path,
        max_length,
        val_ratio,
        num_samples,
        num_proc,
        train_on_prompt,
        pretrain_options,
        drop_earlier_thinking,
    )
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    fmt = resolve_format(model, tokenizer, format)
    options = EncodeOptions(
        str(model), tokenizer, fmt, system or default_system(model), system, max_length, train_on_prompt, num_proc,
        min_doc_tokens or 0, text_column or "text", drop_earlier_thinking,
    )  # fmt: skip
    source, loaded, encoded, dropped = encode_source(spec, source, source_path, num_samples, strict, options)
    train, test = split(encoded.kept, val_ratio, seed)
    data = encoded.dataset(train, test)
    info = _prepare_json(loaded, encoded, dropped, len(train), len(test))
    info.update(
        source=source,
        source_path=str(source_path) if source_path else None,
        model=str(model),
        tokenizer=str(model),
        format=fmt.name,
        prompt_format=fmt.name,
        max_length=max_length,
        val_ratio=val_ratio,
        seed=seed,
        num_samples=num_samples,
    )
    if task == "pretrain":
        info.update(text_column=options.text_column)
    default_out = Path("datasets") / spec.output_name(source, source_path, model, num_samples)
    out = Path(output_dir) if output_dir else default_out
    write_prepared(out, data, {key: info[key] for key in _INFO_ORDER if key in info})
    log.info(
        "prepared %s: %d train / %d test %s (%d read, %d dropped, %d truncated), format %s",
        out, len(train), len(test), encoded.noun, loaded.read, sum(dropped.values()),
        sum(encoded.truncated.values()), fmt.name,
    )  # fmt: skip
    return out


def encode_source(
    spec: Task, source: str | None, source_path, num_samples: int | None, strict: bool, options: EncodeOptions
) -> tuple[str, Loaded, Encoded, Counter]:
    """One source read, shaped and encoded by a task: (source name, rows read, encoded, every drop reason)."""
    if spec.read is not None:
        source, loaded = spec.read(source, source_path, num_samples, strict, options)
    else:
        loaded = load_rows(spec.shapes, source, source_path, num_samples, strict)
        source = source or source_for_path(source_path)
    encoded = spec.encode(loaded, options)
    dropped = loaded.dropped + encoded.dropped
    _check_enough_kept(loaded, encoded.kept, dropped, str(source_path or source), spec.filters)
    return source, loaded, encoded, dropped


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
    drop_earlier_thinking: bool = False,
) -> Path:
    """Turns raw data into a tokenized, loss-masked train/test DatasetDict on disk (`aift prepare --task sft`).

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
        drop_earlier_thinking: Remove the reasoning of answers before the last user message (as Qwen3's
            template does); by default every answer keeps and trains its reasoning.

    Returns:
        The output folder.
    """
    return prepare(
        "sft", model, source, source_path, num_samples, format, output_dir, max_length, val_ratio, seed,
        train_on_prompt, system, strict, trust_remote_code, num_proc,
        drop_earlier_thinking=drop_earlier_thinking,
    )  # fmt: skip


def prepare_preference(
    model: str = EMBEDDED_MODEL,
    source: str | None = None,
    source_path: str | Path | None = None,
    num_samples: int | None = None,
    format: str = "auto",
    output_dir: str | Path | None = None,
    max_length: int = 1024,
    val_ratio: float = 0.05,
    seed: int = 42,
    system: str | None = None,
    strict: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Preference pairs (or KTO examples) from a local file -> a tokenized train/test DatasetDict on disk.

    `aift prepare --task preference`; the accepted shapes are in aift.data.preference.

    Args:
        model: Registered name, hub id or folder; gives the tokenizer and the default prompt format.
        source: json, jsonl, csv or parquet; None takes it from the file suffix.
        source_path: The local file.
        num_samples: Use only the first N rows.
        format: ``auto`` or a name from ``aift.data.formats.FORMATS``.
        output_dir: Default ``datasets/preference_{file stem}_{model basename}``.
        max_length: Prompt + answer are cut to this many tokens (prompt side first).
        val_ratio: Share of rows in the test split.
        seed: Seed of the train/test shuffle.
        system: System prompt for prompts without one (default: the model card's, if any).
        strict: Fail on the first unusable row instead of dropping it.
        trust_remote_code: Allow tokenizers that run code from their hub repository.

    Returns:
        The output folder.
    """
    return prepare(
        "preference", model, source, source_path, num_samples, format, output_dir, max_length, val_ratio, seed,
        system=system, strict=strict, trust_remote_code=trust_remote_code,
    )  # fmt: skip
