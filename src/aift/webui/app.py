"""The `aift webui` studio: a JSON API over aift's library and one static page (static/index.html).

    from aift.webui.app import create_app
    app = create_app(runs_dir="runs")          # then: uvicorn.run(app, host="127.0.0.1", port=7860)

All state lives on disk: runs are folders under ``runs_dir`` (see aift.webui.runs), datasets are folders
below the data roots (aift.webui.data). The server keeps only a cache of models loaded for chat.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from aift.errors import AiftError
from aift.export.run import FORMATS, GGUF_QUANTS, run_export
from aift.webui import data as webdata
from aift.webui import runs

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
_CHAT_CACHE_SIZE = 2  # loaded models kept for chat (each is a whole model in memory)


class _ChatModels:
    """Models loaded for chat, one per run's final/ folder, reloaded when that folder changes."""

    def __init__(self) -> None:
        self._models: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self._lock = threading.Lock()  # one load at a time; generation itself runs outside the lock

    def get(self, final: Path):
        from aift.inference.runner import load_for_inference

        key = (str(final), final.stat().st_mtime)
        with self._lock:
            if key not in self._models:
                for old in [k for k in self._models if k[0] == key[0]]:
                    del self._models[old]
                self._models[key] = load_for_inference(str(final), device="cpu" if _no_cuda() else None)
                while len(self._models) > _CHAT_CACHE_SIZE:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def create_app(runs_dir: str | Path = "runs", data_dirs: list[str | Path] | None = None, host: str = "127.0.0.1"):
    """The FastAPI app of the web UI.

    Args:
        runs_dir: Where runs live (one folder each); created when missing.
        data_dirs: Folders whose raw files and prepared datasets the UI may read (default: ./data and
            ./datasets); RUNS/datasets, where the UI prepares data, is always one.
        host: The address the server is bound to; on a loopback address, requests naming another Host are
            refused (a web page elsewhere cannot drive the UI through DNS rebinding).
    """
    runs_dir = Path(runs_dir).expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    roots = webdata.DataRoots(
        runs_dir, [Path(d) for d in (data_dirs if data_dirs is not None else ["data", "datasets"])]
    )
    chat_models = _ChatModels()
    app = FastAPI(title="aift webui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs_dir, app.state.roots = runs_dir, roots

    @app.middleware("http")
    async def local_json_only(request: Request, call_next):
        hostname = request.headers.get("host", "").rsplit(":", 1)[0]
        if host in _LOCAL_HOSTS and hostname not in _LOCAL_HOSTS:
            return PlainTextResponse(f"host {hostname!r} refused: this UI serves its own machine only", 403)
        # Cross-site forms can post text/plain without a CORS preflight; JSON requests cannot.
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] != "application/json":
            return JSONResponse({"error": "POST bodies must be application/json"}, 415)
        return await call_next(request)

    @app.exception_handler(AiftError)
    async def aift_error(request: Request, error: AiftError):
        return JSONResponse({"error": str(error)}, 400)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/options")
    def options():
        from aift.data.formats import FORMAT_CHOICES
        from aift.models.registry import EMBEDDED_MODEL, SUPPORTED_MODELS

        return {
            "fields": runs.config_fields(),
            "methods": list(runs.METHODS),
            "models": [EMBEDDED_MODEL, *(m for m in SUPPORTED_MODELS if m != EMBEDDED_MODEL)],
            "formats": list(FORMAT_CHOICES),
            "runs_dir": str(runs_dir),
        }

    @app.get("/api/datasets")
    def datasets():
        return roots.listing()

    @app.get("/api/preview")
    def preview(path: str, n: int = 3, split: str = "train"):
        return webdata.preview(roots.resolve(path), n, split)

    @app.post("/api/prepare")
    def prepare(body: dict = Body(...)):
        out = webdata.prepare(roots, body.get("source_path", ""), body.get("name", ""), dict(body.get("options") or {}))
        return {"path": str(out)}

    @app.get("/api/runs")
    def list_runs():
        return {"runs": runs.list_runs(runs_dir)}

    @app.post("/api/runs")
    def start_run(body: dict = Body(...)):
        training = dict(body.get("training") or {})
        if training.get("dataset_path"):
            training["dataset_path"] = str(roots.resolve(str(training["dataset_path"])))
        request = runs.build_request(body.get("method", "lora"), training, body.get("lora"))
        name = runs.check_name(body.get("name", ""))
        process = runs.start_run(runs_dir, name, request)
        return {"name": name, "pid": process.pid}

    @app.get("/api/runs/{name}")
    def run_detail(name: str):
        return runs.run_detail(runs.run_dir(runs_dir, name))

    @app.post("/api/runs/{name}/stop")
    def stop(name: str):
        if not runs.stop_run(runs.run_dir(runs_dir, name)):
            raise runs.WebUIError(f"run {name!r} is not running")
        return {"stopping": name}

    @app.get("/runs/{name}/report")
    def report(name: str):
        from aift.eval.report import build_report

        path = runs.run_dir(runs_dir, name)
        return FileResponse(build_report([path], path / "report"), media_type="text/html")

    @app.post("/api/runs/{name}/chat")
    def chat(name: str, body: dict = Body(...)):
        from aift.inference.runner import GenerationSettings

        final = _final_dir(runs.run_dir(runs_dir, name))
        messages = _messages(body.get("messages"))
        settings = GenerationSettings(
            max_new_tokens=_bounded_int(body.get("max_new_tokens", 128), "max_new_tokens", 1, 2048),
            greedy=bool(body.get("greedy", True)),
            temperature=float(body.get("temperature", 0.7)),
        )
        loaded = chat_models.get(final)
        return StreamingResponse(_stream(loaded, messages, settings), media_type="text/plain; charset=utf-8")

    @app.post("/api/runs/{name}/merge")
    def merge(name: str, body: dict = Body(default={})):
        from aift.export.merge import merge_adapter
        from aift.models.run_folder import is_adapter_dir

        path = runs.run_dir(runs_dir, name)
        final = _final_dir(path)
        if not is_adapter_dir(final):
            raise runs.WebUIError(f"run {name!r} is a full fine-tune: its final/ is already a whole model")
        dtype = _choice(body.get("dtype", "bf16"), "dtype", ("bf16", "fp16", "fp32"))
        base_weights = _choice(body.get("base_weights", "original"), "base_weights", ("original", "dequantized"))
        out = merge_adapter(final, path / "merged", dtype=dtype, overwrite=True, base_weights=base_weights)
        return {"path": str(out)}

    @app.post("/api/runs/{name}/export")
    def export(name: str, body: dict = Body(default={})):
        path = runs.run_dir(runs_dir, name)
        fmt = _choice(body.get("format", "gguf"), "format", FORMATS)
        if fmt == "safetensors":
            return _export_safetensors(path)
        return _export_gguf(path, _choice(body.get("quant", "f16"), "quant", GGUF_QUANTS))

    @app.get("/runs/{name}/exports/{file}")
    def download(name: str, file: str):
        folder = runs.run_dir(runs_dir, name) / "exports"
        target = folder / runs.check_name(file)
        if not target.is_file():
            raise runs.WebUIError(f"no exported file {file!r} in run {name!r}")
        return FileResponse(target, filename=target.name)

    return app


def _final_dir(path: Path) -> Path:
    final = path / "final"
    if not final.is_dir():
        raise runs.WebUIError(f"run {path.name!r} has no final model yet (status: {runs.run_status(path)})")
    return final


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise runs.WebUIError("messages: expected a list of {role, content}, ending with a user message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise runs.WebUIError(f"messages[{i}]: expected role system, user or assistant")
        out.append({"role": m["role"], "content": str(m.get("content", ""))})
    if out[-1]["role"] != "user":
        raise runs.WebUIError("the last message must be the user's")
    return out


def _bounded_int(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as e:
        raise runs.WebUIError(f"{name}: expected an integer, got {value!r}") from e
    if not low <= number <= high:
        raise runs.WebUIError(f"{name}: expected {low}..{high}, got {number}")
    return number


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise runs.WebUIError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _stream(loaded, messages: list[dict], settings) -> Iterator[str]:
    """The answer piece by piece as stream_answer makes it (generation in a worker thread)."""
    from aift.inference.runner import stream_answer

    pieces: queue.Queue = queue.Queue()
    done = object()

    def work() -> None:
        try:
            stream_answer(loaded, messages, settings, on_text=pieces.put)
        except Exception as e:  # noqa: BLE001 - shown in the chat instead of a broken stream
            log.exception("chat generation failed")
            pieces.put(f"\n[error: {e}]")
        finally:
            pieces.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (piece := pieces.get()) is not done:
        yield piece


def _export_safetensors(path: Path) -> dict:
    out = path / "exports" / "safetensors"
    out.parent.mkdir(exist_ok=True)
    run_export(_final_dir(path), out, format="safetensors", dtype="bf16", overwrite=True)
    return {"path": str(out)}


def _export_gguf(path: Path, quant: str) -> dict:
    exports = path / "exports"
    exports.mkdir(exist_ok=True)
    result = run_export(_final_dir(path), exports / f"{path.name}.{quant}.gguf", quant=quant)
    return {
        "path": str(result.path),
        "file": result.path.name,
        "size_mb": round(result.size_mb, 1),
        "passed": result.passed,
        "greedy_match": bool(result.check["greedy_match"]),
        "max_abs_logit_diff": float(result.check["max_abs_logit_diff"]),
    }
