"""What a model or adapter folder is, and writing a folder so that nobody ever sees half of it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aift.errors import AiftError

META_FILE = "aift_meta.json"

# --dtype spellings -> torch dtype names
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
DTYPES |= {"fp16": "float16", "float16": "float16"}


def torch_dtype(name: str):
    """'bf16' / 'fp16' / 'fp32' (or the long names) -> torch dtype, with a clear error otherwise."""
    import torch

    if name not in DTYPES:
        raise AiftError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32")
    return getattr(torch, DTYPES[name])


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter folder: adapter_config.json and no full model beside it."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AiftError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from e


def read_meta(folder: str | Path) -> dict:
    """aift_meta.json of a training output / merged / quantized folder, or {} when it has none."""
    path = Path(folder) / META_FILE
    return read_json(path) if path.is_file() else {}


def base_model_of(folder: str | Path) -> str | None:
    """The base model a fine-tuned folder came from: aift_meta.json first, then adapter_config.json; else None."""
    folder = Path(folder)
    base = read_meta(folder).get("base_model")
    if not base and (folder / "adapter_config.json").is_file():
        base = read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    return str(base) if base else None


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (aift_meta.json first, then adapter_config.json)."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise AiftError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json in it)")
    base = base_model_of(adapter_dir)
    if not base:
        raise AiftError(f"{config_path} names no base model; pass --base")
    return base


def load_folder_tokenizer(folder: str | Path, fallback: str):
    """The tokenizer saved in a fine-tuned folder (training saves it there; it may have added tokens), else the
    base model's; pad token set either way."""
    from aift.models.loading import ensure_pad_token, load_tokenizer

    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(fallback)
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(folder))


def write_meta(folder: Path, meta: dict) -> None:
    from aift import __version__

    (folder / META_FILE).write_text(
        json.dumps({**meta, "aift_version": __version__}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


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
