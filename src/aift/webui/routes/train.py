"""Train view: what the forms offer (/api/options) and starting a run."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends

from aift.webui import runs
from aift.webui.routes import Studio, studio

router = APIRouter()


@router.get("/api/options")
def options(s: Studio = Depends(studio)):
    from aift.data.formats import FORMAT_CHOICES
    from aift.export.run import GGUF_QUANTS
    from aift.models.registry import EMBEDDED_MODEL, SUPPORTED_MODELS

    return {
        "fields": runs.config_fields(),
        "methods": runs.method_choices(),
        "adapters": [{"name": k, "help": v} for k, v in runs.ADAPTERS.items()],
        "tasks": runs.prepare_tasks(),
        "models": [EMBEDDED_MODEL, *(m for m in SUPPORTED_MODELS if m != EMBEDDED_MODEL)],
        "formats": list(FORMAT_CHOICES),
        "gguf_quants": list(GGUF_QUANTS),  # the run view's export choices: aift export --quant's own list
        "runs_dir": str(s.runs_dir),
    }


@router.post("/api/runs")
def start_run(body: dict = Body(...), s: Studio = Depends(studio)):
    training = dict(body.get("training") or {})
    if training.get("dataset_path"):
        training["dataset_path"] = str(s.roots.resolve(str(training["dataset_path"])))
    request = runs.build_request(
        body.get("adapter", "lora"), training, body.get("lora"), body.get("method", "sft"), body.get("options")
    )
    name = runs.check_name(body.get("name", ""))
    process = runs.start_run(s.runs_dir, name, request)
    return {"name": name, "pid": process.pid}
