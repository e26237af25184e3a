"""Export: merge a run's adapter, write a GGUF (read back and checked) or safetensors, download the file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import FileResponse

from aift.webui import runs
from aift.webui.routes import Studio, studio

router = APIRouter()


@router.post("/api/runs/{name}/merge")
def merge(name: str, body: dict = Body(default={}), s: Studio = Depends(studio)):
    from aift.export.merge import merge_adapter
    from aift.models.run_folder import is_adapter_dir

    path = runs.run_dir(s.runs_dir, name)
    final = runs.final_dir(path)
    if not is_adapter_dir(final):
        raise runs.WebUIError(f"run {name!r} is a full fine-tune: its final/ is already a whole model")
    dtype = _choice(body.get("dtype", "bf16"), "dtype", ("bf16", "fp16", "fp32"))
    base_weights = _choice(body.get("base_weights", "original"), "base_weights", ("original", "dequantized"))
    out = merge_adapter(final, path / "merged", dtype=dtype, overwrite=True, base_weights=base_weights)
    return {"path": str(out)}


@router.post("/api/runs/{name}/export")
def export(name: str, body: dict = Body(default={}), s: Studio = Depends(studio)):
    path = runs.run_dir(s.runs_dir, name)
    fmt = _choice(body.get("format", "gguf"), "format", ("gguf", "safetensors"))
    if fmt == "safetensors":
        return _export_safetensors(path)
    return _export_gguf(path, _choice(body.get("quant", "f16"), "quant", ("f32", "f16", "bf16", "q8_0")))


@router.get("/runs/{name}/exports/{file}")
def download(name: str, file: str, s: Studio = Depends(studio)):
    folder = runs.run_dir(s.runs_dir, name) / "exports"
    target = folder / runs.check_name(file)
    if not target.is_file():
        raise runs.WebUIError(f"no exported file {file!r} in run {name!r}")
    return FileResponse(target, filename=target.name)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise runs.WebUIError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _export_safetensors(path: Path) -> dict:
    from aift.export.merge import merge_adapter, save_plain_folder
    from aift.models.run_folder import is_adapter_dir

    final = runs.final_dir(path)
    out = path / "exports" / "safetensors"
    out.parent.mkdir(exist_ok=True)
    if is_adapter_dir(final):
        merge_adapter(final, out, dtype="bf16", overwrite=True)
    else:
        save_plain_folder(str(final), out, dtype="bf16", overwrite=True)
    return {"path": str(out)}


def _export_gguf(path: Path, quant: str) -> dict:
    from aift.export.gguf_writer import export_gguf
    from aift.export.merge import merge_adapter
    from aift.export.verify import verify_gguf
    from aift.models.run_folder import is_adapter_dir

    final = runs.final_dir(path)
    exports = path / "exports"
    exports.mkdir(exist_ok=True)
    target = exports / f"{path.name}.{quant}.gguf"
    with tempfile.TemporaryDirectory(prefix=".aift-merge-", dir=exports) as tmp:
        source = final
        if is_adapter_dir(final):  # a GGUF is written from a whole model (as `aift export`)
            source = merge_adapter(final, Path(tmp) / "merged", dtype="fp32")
        export_gguf(source, target, quant=quant)
        check = verify_gguf(source, target, quant)
    return {
        "path": str(target),
        "file": target.name,
        "size_mb": round(target.stat().st_size / 1e6, 1),
        "passed": bool(check["passed"]),
        "greedy_match": bool(check["greedy_match"]),
        "max_abs_logit_diff": float(check["max_abs_logit_diff"]),
    }
