"""Reading a corpus document by document from a position, for `aift prepare --streaming` and its training.

A *position* in a file is ``(offset, line)``: the byte offset of the next JSON Lines record and its line number
(1-based), or for Parquet the row index (line 0). Reading from a position gives the same documents as reading
the file from its start and skipping what comes before, so a cursor of (file, position, token) resumes a
stream exactly. A ``.txt`` / ``.md`` file is one document, read whole (its position is 0, or its size once
read). Documents are stripped; empty ones and rows without text are skipped and counted, as in
aift.data.text_sources; a line that is not JSON or not UTF-8 is a DataError naming file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aift.data import DataError
from aift.data.shapes import Drop
from aift.data.text_sources import document_converter

KINDS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
MAX_TEXT_FILE = 512 << 20  # a .txt/.md file is one document, read and tokenized whole: keep it well under memory

Position = tuple[int, int]  # (byte offset or row, line)
START: Position = (0, 1)


@dataclass(frozen=True)
class CorpusFile:
    """One file of a streamed corpus as `aift prepare --streaming` saw it (compared again before training)."""

    path: str  # absolute
    kind: str  # text, jsonl or parquet
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> CorpusFile:
        kind = KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{path}: --streaming reads {', '.join(KINDS)} files; convert {path.suffix} files to JSON Lines "
                "(one object with a text field per line), or prepare without --streaming"
            )
        stat = path.stat()
        if kind == "text" and stat.st_size > MAX_TEXT_FILE:
            raise DataError(
                f"{path}: a {path.suffix} file is one document, read whole, and this one has {stat.st_size >> 20} MiB; "
                "split it into files or JSON Lines rows of documents"
            )
        return cls(str(path.resolve()), kind, stat.st_size, stat.st_mtime_ns)

    def changed(self) -> str | None:
        """How the file differs from what prepare recorded (size, modification time), or None."""
        try:
            stat = os.stat(self.path)
        except OSError as e:
            return f"it cannot be read ({e.strerror or e})"
        if stat.st_size != self.size:
            return f"it has {stat.st_size} bytes, prepare saw {self.size}"
        if stat.st_mtime_ns != self.mtime_ns:
            return "it was modified after prepare"
        return None


def read_documents(file: CorpusFile, start: Position, column: str) -> Iterator[tuple[Position, Position, str | None]]:
    """(position of the record, position after it, its document) from ``start`` on; None for a row without one.

    Reading from a record's position gives that record again; reading from the position after the file's last
    record gives nothing.
    """
    convert = document_converter(column)
    if file.kind == "text":
        yield from _text_file(file, start, convert, column)
    elif file.kind == "jsonl":
        yield from _jsonl(file, start, convert)
    else:
        yield from _parquet(file, start, convert, column)


def _convert(convert, data) -> str | None:
    try:
        return convert(data)
    except Drop:
        return None


def _text_file(file: CorpusFile, start: Position, convert, column: str):
    if start[0] == 0:
        raw = Path(file.path).read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{file.path} is not UTF-8 (line {line}, byte {e.start}); save it as UTF-8") from e
        yield START, (max(file.size, 1), 1), _convert(convert, {column: text})


def _jsonl(file: CorpusFile, start: Position, convert):
    offset, line = start
    with open(file.path, "rb") as f:
        f.seek(offset)
        while raw := f.readline():
            where = (offset, line)
            offset, line = offset + len(raw), line + 1
            if not raw.strip():
                continue
            yield where, (offset, line), _convert(convert, _json_line(raw, file.path, where[1]))


def _json_line(raw: bytes, path: str, line: int) -> dict:
    try:
        item = json.loads(raw.decode("utf-8-sig" if line == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: line {line} is not UTF-8 (byte {e.start} of the line); save it as UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON on line {line}, column {e.colno}: {e.msg}") from e
    except (RecursionError, ValueError) as e:
        raise DataError(f"{path}: line {line} cannot be read as JSON ({type(e).__name__})") from e
    if not isinstance(item, dict):
        raise DataError(f"{path}: line {line} is a {type(item).__name__}, expected an object")
    return item


def _parquet(file: CorpusFile, start: Position, convert, column: str):
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(file.path)
    if column not in reader.schema_arrow.names:
        raise DataError(f"{file.path}: no column {column!r} (columns: {', '.join(reader.schema_arrow.names)})")
    row = 0
    for group in range(reader.num_row_groups):  # one row group's text column in memory at a time
        n = reader.metadata.row_group(group).num_rows
        if row + n > start[0]:
            texts = reader.read_row_group(group, columns=[column]).column(0).to_pylist()
            for i in range(max(0, start[0] - row), n):
                yield (row + i, 0), (row + i + 1, 0), _convert(convert, {column: texts[i]})
        row += n


def first_document_check(file: CorpusFile, column: str) -> None:
    """DataError when a file's first record is not a document row (no such column), read cheaply."""
    if file.kind == "parquet":
        next(_parquet(file, (1 << 62, 0), None, column), None)  # reads only the schema
        return
    if file.kind != "jsonl":
        return
    with open(file.path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                item = _json_line(raw, file.path, line)
                if column not in item:
                    keys = ", ".join(sorted(item)) or "none"
                    raise DataError(
                        f"{file.path}: line {line} has no {column!r} field (its fields: {keys}); name the column "
                        "of the documents with --text-column"
                    )
                return
    raise DataError(f"{file.path} is empty")
