"""Documents for continued pretraining: text files, folders and globs of them, and rows with a text column.

`aift prepare --task pretrain --source text --source-path P` reads P as:

- a ``.txt`` / ``.md`` file: one document (the whole file);
- a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file: one document per row, from its ``text`` column (or
  the one named by ``--text-column``);
- a folder: every such file under it, recursively, in sorted order (other files are skipped and counted);
- a glob (``corpus/**/*.md``): the matching files, in sorted order.

Documents are stripped of surrounding whitespace; an empty one is dropped and counted.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from aift.data import DataError
from aift.data.shapes import Drop, Loaded, Row, Shape, ShapeTable, convert_rows
from aift.data.sources import FILE_SOURCES, check_encodable, read_file

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
TEXT_SOURCES = ("text", *FILE_SOURCES)  # text: any of the above, by suffix; jsonl etc.: that reader for a file


def text_table(column: str = "text") -> ShapeTable:
    """The pretrain task's one shape: a document per row, in ``column``."""
    help_text = f"{column} (one document per row; name another column with --text-column; .txt/.md files)"
    return ShapeTable("text", {"text": Shape((column,), (), document_converter(column), help_text)})


def document_converter(column: str):
    """The function from a row to its document (stripped text), raising Drop for a row without one."""

    def convert(data: dict) -> str:
        value = data.get(column)
        if not isinstance(value, str):
            kind = "absent or null" if value is None else f"a {type(value).__name__}"
            raise Drop(f"'{column}' is not text", f"'{column}' is {kind}; expected the document's text")
        text = value.strip()
        if not text:
            raise Drop("empty document", f"'{column}' is empty")
        return check_encodable(text, f"'{column}'")

    return convert


def corpus_files(source_path: str | Path) -> list[Path]:
    """The files a --source-path names: the file, the readable files under a folder, or a glob's matches."""
    path = Path(source_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(str(path)):
        candidates = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not candidates:
            raise DataError(f"{source_path}: the pattern matches no file")
    else:
        raise DataError(f"{path} does not exist")
    files = [p for p in candidates if p.suffix.lower() in TEXT_SUFFIXES + ROW_SUFFIXES]
    if len(files) < len(candidates):
        log.info("%s: skipped %d file(s) that are not %s", source_path, len(candidates) - len(files),
                 "/".join(TEXT_SUFFIXES + ROW_SUFFIXES))  # fmt: skip
    if not files:
        raise DataError(f"{source_path} holds no {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)} file")
    return files


def _read_document(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 (line {line}, byte {e.start}); save it as UTF-8") from e


def _rows(path: Path, source: str | None, table: ShapeTable, column: str) -> list[Row]:
    """One file's rows: a text file is one row holding the whole file in ``column``."""
    if path.suffix.lower() in TEXT_SUFFIXES and source in (None, "text"):
        return [Row({column: _read_document(path)}, str(path))]
    rows = read_file(path, None if source in (None, "text") else source)
    table.detect({k for r in rows[:100] for k in r.data}, str(path))
    return [Row(r.data, f"{path} {r.where}") for r in rows]


def load_documents(
    source: str | None,
    source_path: str | Path | None,
    num_samples: int | None = None,
    strict: bool = False,
    text_column: str = "text",
) -> Loaded:
    """The documents (stripped strings) of a file, folder or glob, with what was dropped and why."""
    if source_path is None:
        raise DataError("--task pretrain needs --source-path FILE, FOLDER or GLOB")
    if source is not None and source not in TEXT_SOURCES:
        raise DataError(f"unknown source {source!r} for --task pretrain; valid sources: {', '.join(TEXT_SOURCES)}")
    table = text_table(text_column)
    rows: list[Row] = []
    for path in corpus_files(source_path):
        rows += _rows(path, source, table, text_column)
        if num_samples is not None and len(rows) >= num_samples:
            break
    total = len(rows)
    loaded = convert_rows(rows[:num_samples] if num_samples is not None else rows, table, "text", str(source_path),
                          strict)  # fmt: skip
    loaded.total_available = total
    return loaded
