"""Reading a folder written by `aift prepare`: the one reader that training, eval, preview and the demo use.

A prepared folder is a ``datasets`` DatasetDict saved with ``save_to_disk`` (``dataset_dict.json`` plus one
folder per split) and ``prepare.json``, which records how it was made (model, prompt format, counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aift.data import DataError
from aift.utils.files import FileFormatError, atomic_folder, read_json_object, write_json_atomic

PREPARE_JSON = "prepare.json"


def read_prepared(path: str | Path) -> tuple[Any, dict]:
    """(DatasetDict, prepare.json contents or {}) of a prepared folder; DataError naming the folder otherwise."""
    from datasets import DatasetDict, load_from_disk

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{path} is not a prepared dataset: the folder does not exist (write one with `aift prepare`)")
    if not (path / "dataset_dict.json").is_file():
        raise DataError(f"{path} is not a prepared dataset (no dataset_dict.json in it); run `aift prepare` first")
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a prepared dataset written by `aift prepare`: {e}") from e
    except IndexError as e:  # what datasets raises for a split saved with no rows
        raise DataError(f"{path}: the dataset is empty (a split without rows)") from e
    if not isinstance(data, DatasetDict):
        raise DataError(f"{path} holds a single split, not the train/test DatasetDict `aift prepare` writes")
    return data, read_prepare_json(path)


def read_prepare_json(path: str | Path) -> dict:
    """prepare.json of a prepared folder, or {} when it has none."""
    meta_file = Path(path).expanduser() / PREPARE_JSON
    if not meta_file.is_file():
        return {}
    try:
        return read_json_object(meta_file, "record of how the dataset was prepared")
    except FileFormatError as e:
        raise DataError(str(e)) from e


def read_split(path: str | Path, split: str, with_prepare_json: bool = False) -> tuple[Any, dict]:
    """One split of a prepared folder and its prepare.json; DataError listing the splits when it is missing.

    with_prepare_json: refuse a folder without prepare.json (preview needs the model and format it was made with).
    """
    if with_prepare_json and not (Path(path).expanduser() / PREPARE_JSON).is_file():
        raise DataError(f"{path} is not a prepared dataset (no {PREPARE_JSON}); make one with `aift prepare`")
    data, meta = read_prepared(path)
    if split not in data:
        raise DataError(f"{Path(path).expanduser()} has no split {split!r} (splits: {', '.join(data.keys())})")
    return data[split], meta


def write_prepared(output_dir: Path, data: Any, info: dict) -> None:
    """Saves a DatasetDict and its prepare.json into ``output_dir`` atomically: built in a temp folder beside it,
    then renamed into place (a previous prepared dataset there is replaced; any other non-empty folder refused).
    Nothing half-written is left behind; disk full or an unwritable folder is a DataError naming it."""
    if output_dir.exists() and not (output_dir / PREPARE_JSON).is_file() and any(output_dir.iterdir()):
        raise DataError(f"{output_dir} exists and is not a prepared dataset; choose another --output-dir")
    try:
        with atomic_folder(output_dir, replace=True) as tmp:
            # An empty split saved with the default (zero) shards cannot be loaded back: give it one.
            shards = {name: 1 if not len(split) else None for name, split in data.items()}
            data.save_to_disk(str(tmp), num_shards=shards)
            write_json_atomic(tmp / PREPARE_JSON, info)
    except OSError as e:  # disk full, quota, an unwritable folder, a file system that refuses the rename
        raise DataError(
            f"cannot write the dataset to {output_dir}: {e.strerror or e}; it was not written, "
            "choose another --output-dir"
        ) from e
