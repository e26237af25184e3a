"""`aift prepare` from the data page, into RUNS/datasets/NAME: each form reaches the library call that the
CLI's flags make (aift.cli.prepare):

- one source (``source_path``): ``prepare(task, ...)``; for raw text (task pretrain) a file, a folder or a glob;
- ``mix``: a list of ``{path, task, weight | samples, split}`` (the YAML ``datasets:`` list, ``--mix``):
  ``prepare_mixture``;
- ``streaming`` (task pretrain, with ``eval_documents``): ``prepare_streaming``.

Every path is checked to lie below the data roots (aift.webui.data.DataRoots) before the library sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aift.models.registry import EMBEDDED_MODEL
from aift.webui.data import RAW_SUFFIXES, DataRoots
from aift.webui.runs import WebUIError, prepare_tasks

OPTIONS = (
    "task", "model", "format", "max_length", "val_ratio", "num_samples", "train_on_prompt", "system", "seed",
    "drop_earlier_thinking", "text_column", "min_doc_tokens", "mix", "streaming", "eval_documents",
)  # fmt: skip
_NUMBERS = {"max_length": int, "num_samples": int, "seed": int, "min_doc_tokens": int, "eval_documents": int,
            "val_ratio": float}  # fmt: skip
_MIX_KEYS = ("path", "task", "weight", "samples", "split", "text_column")


def prepare(roots: DataRoots, source_path: str, name: str, options: dict[str, Any]) -> Path:
    """The dataset ``name`` prepared from ``source_path`` (or ``options["mix"]``) with the form's options."""
    output = roots.prepared_path(name)
    if output.exists():
        raise WebUIError(f"a dataset named {name!r} exists already in {roots.prepared_dir}; choose another name")
    kwargs = _typed(options)
    task = kwargs.pop("task", "sft")
    if task not in prepare_tasks():
        raise WebUIError(f"task must be one of {', '.join(prepare_tasks())}; got {task!r}")
    mix, streaming = kwargs.pop("mix", None), kwargs.pop("streaming", False)
    if task == "pretrain" and not mix:  # a mixture's format and system serve its sft sources
        _check_raw_text(kwargs)
    roots.prepared_dir.mkdir(parents=True, exist_ok=True)
    if mix:
        if source_path:
            raise WebUIError("a mixture names its sources: leave the data file empty")
        return _mixture(roots, mix, task, output, kwargs)
    if streaming:
        return _streaming(roots, source_path, task, output, kwargs)
    if "eval_documents" in kwargs:
        raise WebUIError("eval_documents applies to streaming only (the held-out documents of a streamed corpus)")
    from aift.data.prepare import prepare as prepare_task

    return prepare_task(task, source_path=_source(roots, source_path, task), output_dir=output, **kwargs)


def _typed(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise WebUIError(f"unknown prepare option(s) {sorted(unknown)}; known: {', '.join(sorted(OPTIONS))}")
    kwargs = {k: v for k, v in options.items() if v not in ("", None, False)}  # unset, or a box left unticked
    for key, kind in _NUMBERS.items():
        if key in kwargs:
            try:
                kwargs[key] = kind(kwargs[key])
            except (TypeError, ValueError) as e:
                raise WebUIError(f"{key}: expected a number, got {kwargs[key]!r}") from e
    return kwargs


def _check_raw_text(kwargs: dict[str, Any]) -> None:
    for key in ("train_on_prompt", "system", "format", "drop_earlier_thinking"):
        if kwargs.get(key) not in (None, "auto"):
            raise WebUIError(f"raw text trains on every token, with no prompt format: {key} does not apply")
        kwargs.pop(key, None)


def _source(roots: DataRoots, path: str, task: str) -> str | Path:
    """A data file below the roots; for raw text also a folder or a glob of .txt/.md (and data) files."""
    if task == "pretrain":
        return roots.resolve_corpus(path)
    source = roots.resolve(path)
    if not source.is_file() or source.suffix.lower() not in RAW_SUFFIXES:
        raise WebUIError(f"{path} is not a data file ({', '.join(RAW_SUFFIXES)})")
    return source


def _mixture(roots: DataRoots, mix: Any, task: str, output: Path, kwargs: dict[str, Any]) -> Path:
    """`aift prepare --mix` with the form's rows: each row's path checked below the roots."""
    from aift.data.mixture import prepare_mixture

    if not isinstance(mix, list) or not all(isinstance(row, dict) for row in mix):
        raise WebUIError("mix must be a list of sources {path, task, weight | samples, split}")
    for key in ("num_samples", "train_on_prompt", "drop_earlier_thinking", "text_column"):
        if key in kwargs:
            raise WebUIError(f"a mixture: {key} does not apply (give each source its samples or weight)")
    rows = []
    for i, row in enumerate(mix, 1):
        given = {k: v for k, v in row.items() if v not in ("", None)}
        unknown = sorted(set(given) - set(_MIX_KEYS))
        if unknown:
            raise WebUIError(f"mixture source {i}: unknown key(s) {unknown}; known: {', '.join(_MIX_KEYS)}")
        for key, kind in (("weight", float), ("samples", int)):
            if key in given:
                try:
                    given[key] = kind(given[key])
                except (TypeError, ValueError) as e:
                    raise WebUIError(f"mixture source {i}: {key} must be a number, got {given[key]!r}") from e
        row_task = given.get("task", task)
        rows.append({**given, "path": str(_source(roots, given.get("path", ""), row_task))})
    return prepare_mixture(rows, task=task, output_dir=output, **kwargs)


def _streaming(roots: DataRoots, path: str, task: str, output: Path, kwargs: dict[str, Any]) -> Path:
    """`aift prepare --task pretrain --streaming`: the corpus recorded, its held-out documents written."""
    from aift.data.streaming import prepare_streaming

    if task != "pretrain":
        raise WebUIError(f"streaming streams raw text: use it with task pretrain, not {task}")
    if "num_samples" in kwargs:
        raise WebUIError("streaming trains every document: num_samples does not apply")
    kwargs.pop("val_ratio", None)  # the held-out split is the first eval_documents documents
    model = kwargs.pop("model", EMBEDDED_MODEL)
    return prepare_streaming(model, roots.resolve_corpus(path), output_dir=output, **kwargs)
