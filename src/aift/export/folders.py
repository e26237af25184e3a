"""Writing an export folder so that nobody ever sees half of it, its dtype and its size.

What a run / adapter / model folder is and its aift_meta.json live in :mod:`aift.models.run_folder`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aift.errors import AiftError
from aift.utils.files import atomic_folder

# --dtype spellings -> torch dtype names
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
DTYPES |= {"fp16": "float16", "float16": "float16"}


def torch_dtype(name: str):
    """'bf16' / 'fp16' / 'fp32' (or the long names) -> torch dtype, with a clear error otherwise."""
    import torch

    if name not in DTYPES:
        raise AiftError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32")
    return getattr(torch, DTYPES[name])


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """utils.files.atomic_folder for an export's --output: a non-empty `target` is replaced only with --overwrite."""
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise AiftError(f"{target} exists and is not empty; choose another --output or pass --overwrite")
    with atomic_folder(target, replace=True) as tmp:
        yield tmp


def folder_size(path: str | Path) -> int:
    """Bytes of the weight files in a folder (safetensors / bin / gguf), or of a single file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*") if f.suffix in (".safetensors", ".bin", ".gguf"))
