"""Writing an export folder so that nobody ever sees half of it, its dtype and its size.

What a run / adapter / model folder is and its aift_meta.json live in :mod:`aift.models.run_folder`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aift.errors import AiftError

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
    """Yields a temp folder beside `target`; on success it becomes `target` (old contents replaced only if asked)."""
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise AiftError(f"{target} exists and is not empty; choose another --output or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folder_size(path: str | Path) -> int:
    """Bytes of the weight files in a folder (safetensors / bin / gguf), or of a single file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*") if f.suffix in (".safetensors", ".bin", ".gguf"))
