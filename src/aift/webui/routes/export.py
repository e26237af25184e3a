"""Export: merge a run's adapter, write a GGUF (read back and checked) or safetensors, download the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import FileResponse

from aift.export.run import FORMATS, GGUF_QUANTS, run_export
from aift.models.run_folder import MERGED_DIR, is_adapter_dir
from aift.webui import runs
from aift.webui.routes import Studio, studio

router = APIRouter()


@router.post("/api/runs/{name}/merge")
def merge(name: str, body: dict = Body(default={}), s: Studio = Depends(studio)):
    from aift.export.merge import merge_adapter

    path = runs.run_dir(s.runs_dir, name)
    final = runs.final_dir(path)
    if not is_adapter_dir(final):
        raise runs.WebUIError(f"run {name!r} is a full fine-tune: its final/ is already a whole model")
    dtype = _choice(body.get("dtype", "bf16"), "dtype", ("bf16", "fp16", "fp32"))
    base_weights = _choice(body.get("base_weights", "original"), "base_weights", ("original", "dequantized"))
    out = merge_adapter(final, path / MERGED_DIR, dtype=dtype, overwrite=True, base_weights=base_weights)
    return {"path": str(out)}


@router.post("/api/runs/{name}/export")
def export(name: str, body: dict = Body(default={}), s: Studio = Depends(studio)):
    path = runs.run_dir(s.runs_dir, name)
    fmt = _choice(body.get("format", "gguf"), "format", FORMATS)
    if fmt == "safetensors":
        return _export_safetensors(path)
    return _export_gguf(path, _choice(body.get("quant", "f16"), "quant", GGUF_QUANTS))


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
    out = path / "exports" / "safetensors"
    out.parent.mkdir(exist_ok=True)
    run_export(runs.final_dir(path), out, format="safetensors", dtype="bf16", overwrite=True)
    return {"path": str(out)}


def _export_gguf(path: Path, quant: str) -> dict:
    exports = path / "exports"
    exports.mkdir(exist_ok=True)
    result = run_export(runs.final_dir(path), exports / f"{path.name}.{quant}.gguf", quant=quant)
    return {
        "path": str(result.path),
        "file": result.path.name,
        "size_mb": round(result.size_mb, 1),
        "passed": result.passed,
        "greedy_match": bool(result.check["greedy_match"]),
        "max_abs_logit_diff": float(result.check["max_abs_logit_diff"]),
    }
