"""Files that nobody sees half-written, and the JSON / JSONL readers that say what is wrong with a file.

    write_json_atomic(run / "train_summary.json", summary)   # temp file beside it, fsync, rename
    with atomic_folder(output, replace=True) as tmp:        # tmp becomes output only if the block succeeds
        model.save_pretrained(tmp)
    records = read_jsonl(run / "metrics.jsonl")              # a crash's half-written last line is skipped

A rename within one folder is atomic on POSIX and Windows, so a reader sees the old file or the new one.
Temp files and folders are created with the default mode (the umask applies, as for any other write).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aift.errors import AiftError


class FileFormatError(AiftError, ValueError):
    """A file that is not what it should be (not JSON, not an object, a broken line); the message names it."""


# ---------------------------------------------------------------- writing


def _temp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Writes `data` to a temp file in `path`'s folder, fsyncs it, then renames it onto `path`.

    mode: the new file's permissions before the umask (0o600 for a secret: it is never readable by others).
    """
    path = Path(path)
    while True:
        tmp = _temp_name(path, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_text_atomic(path: Path, text: str, *, mode: int = 0o666) -> None:
    """`text` as UTF-8, written as write_bytes_atomic writes."""
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_json_atomic(path: Path, obj, **json_kwargs) -> None:
    """`obj` as JSON (indent=2, ensure_ascii=False unless given) and a final newline, written atomically."""
    json_kwargs = {"indent": 2, "ensure_ascii": False, **json_kwargs}
    write_text_atomic(path, json.dumps(obj, **json_kwargs) + "\n")


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable; some systems (Windows, some network mounts) cannot open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yields a new temp folder beside `final`; renamed onto `final` when the block succeeds, removed when it fails.

    replace: an existing non-empty `final` is swapped out (moved aside, the new folder renamed in, the old one
    deleted; put back when the rename fails). Without it a non-empty `final` is an AiftError before any work.
    """
    final = Path(final)
    if not replace and _non_empty(final):
        raise AiftError(f"{final} exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(final)
    try:
        yield tmp
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _non_empty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _new_folder(final: Path) -> Path:
    while True:
        tmp = _temp_name(final, "tmp")
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


def _move_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    old = _temp_name(final, "old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- reading


def read_json_object(path: Path, what: str = "file") -> dict:
    """The JSON object in `path`; FileFormatError naming the file, `what` it should be and what is wrong.

    A missing or unreadable file raises the OSError (which names the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: the {what} is not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: the {what} should be a JSON object, not a {type(data).__name__}")
    return data


def read_jsonl(path: Path, *, on_bad_line: Callable[[str], None] | None = None) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line; blank lines are skipped.

    A half-written last line (what a crash in the middle of an append leaves) is skipped. Any other line that is
    not a JSON object is a FileFormatError naming the file and the line, unless `on_bad_line` is given: then
    every bad line is skipped and described to it ("last line truncated", "line 3 is not JSON", ...).
    A missing or unreadable file raises the OSError.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record, problem = _parse_line(line, number, last=number == len(lines))
        if record is not None:
            records.append(record)
        elif on_bad_line is not None:
            on_bad_line(problem)
        elif problem != TRUNCATED:
            raise FileFormatError(f"{path}: {problem}")
    return records


TRUNCATED = "last line truncated"


def _parse_line(line: str, number: int, last: bool) -> tuple[dict | None, str]:
    """(the line's object, "") or (None, what is wrong with it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, TRUNCATED if last else f"line {number} is not JSON ({e.msg})"
    if not isinstance(record, dict):
        return None, f"line {number} is not a JSON object"
    return record, ""
