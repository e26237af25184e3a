"""Datasets as the web UI sees them: raw files and prepared folders below the data roots it was given.

Nothing outside those roots is read: every path from the browser is resolved and checked to lie below one.
Data prepared from the UI goes to ``RUNS/datasets/NAME`` (always a root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aift.data.prepared import PREPARE_JSON  # torch-free, so the UI still starts without importing torch
from aift.utils.files import FileFormatError, read_json_object
from aift.webui.runs import DATASETS_DIR, WebUIError, check_name, data_task

RAW_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")  # the file sources of aift prepare
TEXT_SUFFIXES = (".txt", ".md")  # documents of raw text (--task pretrain), listed beside the data files
_SEARCH_DEPTH = 3  # data/<group>/<dataset>/


class DataRoots:
    """The folders the UI may read datasets from; paths are shown relative to the one holding them."""

    def __init__(self, runs_dir: Path, data_dirs: list[Path]):
        self.prepared_dir = (runs_dir / DATASETS_DIR).resolve()
        self.roots = [self.prepared_dir, *(Path(d).expanduser().resolve() for d in data_dirs)]

    def resolve(self, path: str) -> Path:
        """An absolute path below a root, or WebUIError (no '..' escapes, no symlink tricks)."""
        if not isinstance(path, str) or not path.strip():
            raise WebUIError("no path given")
        given = Path(path).expanduser()
        candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in self.roots]
        for candidate in candidates:
            if any(candidate.is_relative_to(root) for root in self.roots) and candidate.exists():
                return candidate
        roots = ", ".join(str(r) for r in self.roots)
        raise WebUIError(f"{path} is not a file or folder below the data folders ({roots}); start with --data-dir")

    def resolve_corpus(self, path: str) -> str:
        """Raw text's source below a root: a file, a folder, or a glob whose folder (the part before the first
        wildcard) is below a root, as is every file it matches (no link out). The absolute path or pattern."""
        import glob

        from aift.data.text_sources import corpus_files

        if not isinstance(path, str) or not glob.has_magic(path):
            pattern = str(self.resolve(path))
        else:
            parts = Path(path).parts
            first_wild = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            if first_wild == 0:
                raise WebUIError(f"{path}: name the folder the pattern looks in, e.g. corpus/*.md")
            pattern = str(self.resolve(str(Path(*parts[:first_wild]))).joinpath(*parts[first_wild:]))
        for file in corpus_files(pattern):
            self.resolve(str(file.resolve()))
        return pattern

    def listing(self) -> dict[str, list[dict[str, Any]]]:
        """Prepared dataset folders and raw data files below the roots."""
        prepared, raw = [], []
        for root in self.roots:
            if not root.is_dir():
                continue
            for path in _walk(root, _SEARCH_DEPTH):
                if path.is_dir() and (path / PREPARE_JSON).is_file():
                    prepared.append(_prepared_row(path))
                elif path.is_file() and path.suffix.lower() in RAW_SUFFIXES + TEXT_SUFFIXES:
                    raw.append({"path": str(path), "name": path.name, "size": path.stat().st_size})
        return {"prepared": prepared, "raw": raw, "roots": [str(r) for r in self.roots]}

    def prepared_path(self, name: str) -> Path:
        return self.prepared_dir / check_name(name)


def _walk(root: Path, depth: int, top: Path | None = None):
    try:
        children = sorted(root.iterdir())
    except OSError:
        return
    for child in children:
        # Hidden files, and links leading out of the data folder (resolve() would refuse them anyway).
        if child.name.startswith(".") or (child.is_symlink() and not child.resolve().is_relative_to(top or root)):
            continue
        yield child
        if child.is_dir() and depth > 1 and not (child / PREPARE_JSON).is_file():
            yield from _walk(child, depth - 1, top or root)


def _prepared_row(path: Path) -> dict[str, Any]:
    info = _info(path)
    counts = info.get("counts") or {}
    return {
        "path": str(path),
        "name": path.name,
        "model": info.get("model"),
        "task": data_task(path),
        "format": info.get("format"),
        "max_length": info.get("max_length"),
        "train": counts.get("train"),
        "test": counts.get("test"),
    }


def preview(path: Path, n: int, split: str) -> dict[str, Any]:
    """aift preview's view as JSON: each example as runs of (text, trained, thinking); the page escapes and
    highlights (the reasoning inside <think>...</think> in a colour of its own).

    Preference data comes as pairs, chosen beside rejected (KTO's labelled rows: one side and the label).
    """
    if split not in ("train", "test"):
        raise WebUIError(f"split must be train or test, got {split!r}")
    n = max(1, min(int(n), 20))
    if data_task(path) == "preference":
        return _preview_pairs(path, n, split)
    from aift.data.preview import preview_dataset

    result = preview_dataset(path, n=n, split=split)
    total = result.trained + result.masked
    return {
        "path": str(path),
        "split": split,
        "kind": "sft",
        "info": {k: result.info.get(k) for k in ("format", "model", "max_length", "train_on_prompt", "counts")},
        "examples": [
            {
                "index": e.index,
                "runs": [[text, trained, thinking] for text, trained, thinking in e.styled()],
                "trained": e.trained,
                "masked": e.masked,
                "warnings": e.warnings,
            }
            for e in result.examples
        ],
        "trained": result.trained,
        "masked": result.masked,
        "trained_share": result.trained / total if total else 0.0,
        "warnings": result.warnings,
    }


def _preview_pairs(path: Path, n: int, split: str) -> dict[str, Any]:
    """`aift preview` of a preference dataset: each pair's sides, trained runs marked, as JSON."""
    from aift.data.preference import preview_pairs
    from aift.data.prepared import read_split
    from aift.models.loading import load_tokenizer

    dataset, info = read_split(path, split, with_prepare_json=True)
    pairs = preview_pairs(dataset, load_tokenizer(info["tokenizer"]), n)
    return {
        "path": str(path),
        "split": split,
        "kind": "pairs",
        "info": {k: info.get(k) for k in ("task", "shape", "format", "model", "max_length", "counts")},
        "rows": len(dataset),
        "pairs": [
            {
                "index": p.index,
                "label": p.label,
                "sides": [
                    {"name": side, "runs": [[text, trained] for text, trained in runs], "trained": p.trained[side]}
                    for side, runs in p.sides.items()
                ],
            }
            for p in pairs
        ],
    }


def _info(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path / PREPARE_JSON)
    except (OSError, FileFormatError):  # a listing shows the folder with what it has
        return {}
