"""The `aift webui` studio: a JSON API over aift's library and one static page (static/: index.html, its
studio.js and studio.css).

    from aift.webui.app import create_app
    app = create_app(runs_dir="runs")          # then: uvicorn.run(app, host="127.0.0.1", port=7860)

All state lives on disk: runs are folders under ``runs_dir`` (see aift.webui.runs), datasets are folders
below the data roots (aift.webui.data). The server keeps only a cache of models loaded for chat. The routes
are one router per view, in aift.webui.routes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from aift.errors import AiftError
from aift.webui.data import DataRoots
from aift.webui.routes import Studio, chat, data, export, runs, train

STATIC = Path(__file__).parent / "static"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
ROUTERS = (data.router, train.router, runs.router, chat.router, export.router)


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
    roots = DataRoots(runs_dir, [Path(d) for d in (data_dirs if data_dirs is not None else ["data", "datasets"])])
    app = FastAPI(title="aift webui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs_dir = runs_dir  # `aift webui` prints it
    app.state.studio = Studio(runs_dir, roots, chat.ChatModels())
    app.middleware("http")(_local_json_only(host))
    app.add_exception_handler(AiftError, _aift_error)
    app.get("/")(_index)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's studio.js and studio.css
    for router in ROUTERS:
        app.include_router(router)
    return app


def _local_json_only(host: str):
    async def middleware(request: Request, call_next):
        hostname = request.headers.get("host", "").rsplit(":", 1)[0]
        if host in _LOCAL_HOSTS and hostname not in _LOCAL_HOSTS:
            return PlainTextResponse(f"host {hostname!r} refused: this UI serves its own machine only", 403)
        # Cross-site forms can post text/plain without a CORS preflight; JSON requests cannot.
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] != "application/json":
            return JSONResponse({"error": "POST bodies must be application/json"}, 415)
        return await call_next(request)

    return middleware


async def _aift_error(request: Request, error: AiftError):
    return JSONResponse({"error": str(error)}, 400)


def _index():
    return FileResponse(STATIC / "index.html", media_type="text/html")
