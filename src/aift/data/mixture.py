"""Several sources in one prepared dataset: `aift prepare --mix a.jsonl:0.7,b.jsonl:0.3` or ``--mix mix.yaml``.

The YAML holds a ``datasets:`` list; each item is ``{path, source, task, weight | samples, split, text_column}``::

    datasets:
      - {path: examples/pretrain/domain.jsonl, task: pretrain, weight: 0.7}
      - {path: data/ja_qa.jsonl, task: sft, weight: 0.3}   # replay of instruction data against forgetting
      - {path: examples/pretrain/held_out.jsonl, task: pretrain, split: test}

Each source is read, shaped and encoded by its task (the same pipeline as one source, aift.data.prepare), so
SFT rows and pretraining text mix: SFT examples are packed by the trainer, text keeps its prepared blocks.

How many examples (SFT rows, documents of text) each source gives:

- ``samples: N``: N of them, drawn without repeats; more than the source holds repeats it whole, then draws
  the rest (upsampling);
- ``weight: w``: the weighted sources share the mixture in proportion to their weights, as large as it can be
  without repeating any of them: the scarcest is used whole, the others are drawn down to their share;
- neither: all of it.

``split``: ``auto`` (default) splits the source by ``--val-ratio``, ``train`` or ``test`` puts all of it
there. Every draw and split is seeded by ``--seed``: the same command gives the same dataset. prepare.json's
``mixture`` lists each source's counts, and `aift preview` shows them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aift.data import DataError
from aift.data.formats import default_system, resolve_format
from aift.data.prepare import TASKS, check_options, encode_source, split
from aift.data.prepared import write_prepared
from aift.data.pretrain import NO_BLOCK
from aift.data.sft import PROMPT_MESSAGES
from aift.data.task import EncodeOptions
from aift.models.registry import EMBEDDED_MODEL

log = logging.getLogger(__name__)

SPLITS = ("auto", "train", "test")
_KEYS = ("path", "source", "task", "weight", "samples", "split", "text_column")
_TEXT_COLUMNS = {"text": "", "prompt": "", "reference": ""}  # what an SFT row has and a text piece lacks


@dataclass(frozen=True)
class MixSource:
    """One source of a mixture (see the module's docstring for what each field means)."""

    path: str
    task: str = "sft"
    source: str | None = None
    weight: float | None = None
    samples: int | None = None
    split: str = "auto"
    text_column: str | None = None

    def __post_init__(self) -> None:
        where = f"mixture source {self.path!r}"
        if self.task not in TASKS:
            raise DataError(f"{where}: unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")
        if self.weight is not None and self.samples is not None:
            raise DataError(f"{where}: give weight or samples, not both")
        if self.weight is not None and not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise DataError(f"{where}: weight must be a positive number, got {self.weight!r}")
        if self.samples is not None and not (isinstance(self.samples, int) and self.samples > 0):
            raise DataError(f"{where}: samples must be a positive integer, got {self.samples!r}")
        if self.split not in SPLITS:
            raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {self.split!r}")


def parse_mix(spec: str | Path | list, task: str = "sft") -> list[MixSource]:
    """``a.jsonl:0.7,b.jsonl:0.3`` (each with ``task``), a YAML file with a ``datasets:`` list, or that list."""
    if isinstance(spec, list):
        return _from_list(spec, task, "the datasets list")
    text = str(spec)
    if text.lower().endswith((".yaml", ".yml")):
        return _from_yaml(Path(text), task)
    sources = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        path, _, weight = item.rpartition(":")
        try:
            sources.append(MixSource(path, task, weight=float(weight)) if path else MixSource(item, task))
        except ValueError:  # a ':' that is part of the path
            sources.append(MixSource(item, task))
    if not sources:
        raise DataError(f"--mix {text!r} names no source; expected PATH:WEIGHT,PATH:WEIGHT or a YAML file")
    return sources


def _from_yaml(path: Path, task: str) -> list[MixSource]:
    if not path.is_file():
        raise DataError(f"--mix {path}: the file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list):
        raise DataError(f"{path}: expected a mapping with a 'datasets:' list of {{path, weight | samples, ...}}")
    return _from_list(data["datasets"], task, str(path))


def _from_list(items: list, task: str, where: str) -> list[MixSource]:
    sources = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict) or "path" not in item:
            raise DataError(f"{where}: item {i} must be a mapping with a 'path' (and weight | samples, ...)")
        unknown = sorted(set(item) - set(_KEYS))
        if unknown:
            raise DataError(f"{where}: item {i} has unknown key(s) {unknown}; known keys: {', '.join(_KEYS)}")
        sources.append(MixSource(**{"task": task, **item, "path": str(item["path"])}))
    if not sources:
        raise DataError(f"{where}: the datasets list is empty")
    return sources


def draw_counts(sources: list[MixSource], available: list[int]) -> list[int]:
    """How many examples each source gives (see the module's docstring)."""
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    total_weight = sum(sources[i].weight for i in weighted)
    # The largest mixture of the weighted sources in which none repeats: the scarcest bounds it.
    size = min((available[i] * total_weight / sources[i].weight for i in weighted), default=0)
    counts = []
    for i, s in enumerate(sources):
        if s.samples is not None:
            counts.append(s.samples)
        elif s.weight is not None:
            counts.append(min(available[i], max(1, round(size * s.weight / total_weight))))
        else:
            counts.append(available[i])
    return counts


def draw(n: int, available: int, rng: random.Random) -> list[int]:
    """``n`` positions of ``available`` examples: whole copies of all of them, then a sample of the rest."""
    whole, rest = divmod(n, available)
    return [*range(available)] * whole + sorted(rng.sample(range(available), rest))


def _split_drawn(drawn: list[int], how: str, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and test positions; the copies of an upsampled example stay in its split."""
    if how != "auto":
        return (drawn, []) if how == "train" else ([], drawn)
    unique = list(dict.fromkeys(drawn))
    _, test_at = split(len(unique), val_ratio, seed)
    test = {unique[k] for k in test_at}
    return [p for p in drawn if p not in test], [p for p in drawn if p in test]


def _unify(part: Any, task: str, block_offset: int) -> tuple[Any, int]:
    """A source's split with the mixture's columns: SFT rows get block -1, text pieces empty text columns."""
    from datasets import Value

    if task == "pretrain":
        blocks = [b + block_offset for b in part["block"]]
        part = part.remove_columns("block").add_column("block", blocks, feature=Value("int32"))
        for name, value in _TEXT_COLUMNS.items():
            part = part.add_column(name, [value] * len(part), feature=Value("string"))
        return part, max(blocks, default=block_offset - 1) + 1
    return part.add_column("block", [NO_BLOCK] * len(part), feature=Value("int32")), block_offset


def _same_columns(parts: list) -> list:
    """The parts, with an empty prompt_messages column (a chat source's, aift.data.sft) on those without one
    when any has it, so that they concatenate."""
    from datasets import Value

    if not any(PROMPT_MESSAGES in part.column_names for part in parts):
        return parts
    return [
        part if PROMPT_MESSAGES in part.column_names
        else part.add_column(PROMPT_MESSAGES, [""] * len(part), feature=Value("string"))
        for part in parts
    ]  # fmt: skip


def _check_tasks(sources: list[MixSource]) -> None:
    tasks = {s.task for s in sources}
    if "preference" in tasks and len(tasks) > 1:
        raise DataError(f"a mixture of preference pairs cannot hold {' or '.join(sorted(tasks - {'preference'}))} "
                        "data: mix preference sources only, or sft and pretrain sources")  # fmt: skip


def prepare_mixture(
    mix: str | Path | list,
    model: str = EMBEDDED_MODEL,
    task: str = "sft",
    format: str = "auto",
    output_dir: str | Path | None = None,
    max_length: int = 2048,
    val_ratio: float = 0.05,
    seed: int = 42,
    system: str | None = None,
    strict: bool = False,
    trust_remote_code: bool = False,
    num_proc: int | None = None,
    min_doc_tokens: int | None = None,
) -> Path:
    """Several sources -> one tokenized train/test DatasetDict on disk, with per-source counts in prepare.json.

    Args:
        mix: ``PATH:WEIGHT,...``, a YAML file with a ``datasets:`` list, or that list (see the module docstring).
        task: The task of sources that name none.
        The others: as for :func:`aift.data.prepare.prepare`.

    Returns:
        The output folder (default ``datasets/mixture_{model basename}``).
    """
    from datasets import DatasetDict, concatenate_datasets

    from aift.models.loading import load_tokenizer

    sources = parse_mix(mix, task)
    _check_tasks(sources)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    fmt = resolve_format(model, tokenizer, format)
    base = EncodeOptions(str(model), tokenizer, fmt, system or default_system(model), system, max_length,
                         num_proc=num_proc, min_doc_tokens=min_doc_tokens or 0)  # fmt: skip
    encoded_sources = []
    for s in sources:
        spec = TASKS[s.task]
        given = {"text-column": s.text_column}  # --min-doc-tokens is global: it filters the text sources only
        check_options(spec, s.source, s.path, max_length, val_ratio, None, num_proc, False, given)
        options = dataclasses.replace(base, text_column=s.text_column or "text")
        encoded_sources.append(encode_source(spec, s.source, s.path, None, strict, options))
    counts = draw_counts(sources, [e.kept for _, _, e, _ in encoded_sources])
    parts: dict[str, list] = {"train": [], "test": []}
    block_offset, listing = 0, []
    for k, (s, (name, loaded, encoded, dropped), n) in enumerate(zip(sources, encoded_sources, counts, strict=True)):
        drawn = draw(n, encoded.kept, random.Random(f"{seed}:{k}"))
        train, test = _split_drawn(drawn, s.split, val_ratio, seed)
        data = encoded.dataset(train, test)
        for split_name in ("train", "test"):
            part = data[split_name]
            if s.task != "preference":
                part, block_offset = _unify(part, s.task, block_offset)
            parts[split_name].append(part)
        listing.append(_listing(s, name, loaded, encoded, dropped, n, len(train), len(test), len(data["train"])))
        if n > encoded.kept:
            log.info("%s: %d examples drawn from %d (repeated)", s.path, n, encoded.kept)
    dataset = DatasetDict({name: concatenate_datasets(_same_columns(p)) for name, p in parts.items()})
    info = _info(sources, listing, model, fmt.name, max_length, val_ratio, seed, dataset)
    out = Path(output_dir) if output_dir else Path("datasets") / f"mixture_{Path(str(model).rstrip('/')).name}"
    write_prepared(out, dataset, info)
    for line in describe(info):
        log.info("%s", line)
    return out


def _listing(s: MixSource, name: str, loaded, encoded, dropped: Counter, n: int, train: int, test: int,
             rows: int) -> dict:  # fmt: skip
    return {
        "path": s.path, "task": s.task, "source": name, "shape": loaded.shape, "weight": s.weight,
        "samples": s.samples, "split": s.split, "read": loaded.read, "dropped": dict(dropped),
        "available": encoded.kept, "drawn": n, "train": train, "test": test, "train_rows": rows,
    }  # fmt: skip


def _info(sources, listing, model, fmt_name, max_length, val_ratio, seed, dataset) -> dict:
    from aift import __version__

    tasks = {s.task for s in sources}
    return {
        "task": "preference" if tasks == {"preference"} else "mixture",
        "model": str(model),
        "tokenizer": str(model),
        "format": fmt_name,
        "prompt_format": fmt_name,
        "max_length": max_length,
        "val_ratio": val_ratio,
        "seed": seed,
        "counts": {"train": len(dataset["train"]), "test": len(dataset["test"])},
        "mixture": listing,
        "aift_version": __version__,
    }


def describe(info: dict) -> list[str]:
    """One line per source of a mixture's prepare.json (empty for a single source), for the log and preview."""
    lines = []
    drawn_total = sum(s["drawn"] for s in info.get("mixture", [])) or 1
    for s in info.get("mixture", []):
        how = f"weight {s['weight']}" if s["weight"] is not None else (
            f"samples {s['samples']}" if s["samples"] is not None else "all")  # fmt: skip
        lines.append(
            f"source {s['path']} ({s['task']}, {how}, split {s['split']}): {s['drawn']} of {s['available']} "
            f"examples ({s['drawn'] / drawn_total:.0%} of the mixture), {s['train']} train / {s['test']} test"
        )
    return lines
