#!/usr/bin/env python3
"""Regenerate the .json and .csv copies of the bundled sample data.

The ``.jsonl`` files in this directory are the source of truth. For each one
(all ``data/*.jsonl`` by default, or only the paths given on the command line)
this script writes, next to it:

* ``NAME.json`` -- the same rows as one JSON array (``indent=1``,
  ``ensure_ascii=False``, UTF-8), always;
* ``NAME.csv``  -- the same rows as CSV (UTF-8, header row taken from the keys,
  quoting by the ``csv`` module), but only when the rows are *flat*: every row
  is an object with the same keys in the same order and every value is a
  string. Files whose rows hold lists or objects (for example chat data with a
  ``"messages"`` list) get no CSV; a note is printed instead.

Outputs are written to a temporary file in the same directory and moved into
place with ``os.replace``, so a reader never sees a half-written file. The
script only reads the ``.jsonl`` files; it never modifies them. Standard library
only.

Usage::

    python data/make_formats.py                      # every data/*.jsonl
    python data/make_formats.py data/ja_qa.jsonl     # only the files named

The exit status is 1 if any input file could not be read or parsed (the other
files are still processed), otherwise 0.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def read_jsonl(path: Path) -> list[dict]:
    """Return the rows of a JSON Lines file; blank lines are ignored.

    Raises ``ValueError`` naming the line if a line is not a JSON object.
    """
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path.name}:{lineno}: expected a JSON object")
            rows.append(row)
    return rows


def csv_header(rows: list[dict]) -> list[str] | None:
    """Return the CSV header if the rows are flat, otherwise ``None``.

    Flat means: at least one row, all rows have the same keys in the same
    order, and every value is a string (so CSV round-trips them exactly).
    """
    if not rows:
        return None
    keys = list(rows[0])
    for row in rows:
        if list(row) != keys or not all(isinstance(v, str) for v in row.values()):
            return None
    return keys


def write_atomic(path: Path, write) -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, then replace ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def convert(src: Path) -> str:
    """Write ``src``'s .json (and .csv when flat) copies; return a one-line report."""
    rows = read_jsonl(src)

    def write_json(fh):
        json.dump(rows, fh, ensure_ascii=False, indent=1)
        fh.write("\n")

    write_atomic(src.with_suffix(".json"), write_json)
    report = f"{src.name}: {len(rows)} rows -> {src.with_suffix('.json').name}"

    header = csv_header(rows)
    if header is None:
        return report + " (rows not flat string fields: no CSV)"

    def write_csv(fh):
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(src.with_suffix(".csv"), write_csv)
    return report + f", {src.with_suffix('.csv').name}"


def main(argv: list[str]) -> int:
    sources = [Path(a) for a in argv] if argv else sorted(DATA_DIR.glob("*.jsonl"))
    if not sources:
        print(f"no .jsonl files in {DATA_DIR}", file=sys.stderr)
        return 1
    status = 0
    for src in sources:
        if src.suffix != ".jsonl":
            print(f"skipping {src}: not a .jsonl file", file=sys.stderr)
            status = 1
            continue
        try:
            print(convert(src))
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
