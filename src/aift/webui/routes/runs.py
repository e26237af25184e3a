"""Runs view: the runs on disk, one run's progress and curves, stopping it, its HTML report."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from aift.webui import runs
from aift.webui.routes import Studio, studio

router = APIRouter()


@router.get("/api/runs")
def list_runs(s: Studio = Depends(studio)):
    return {"runs": runs.list_runs(s.runs_dir)}


@router.get("/api/runs/{name}")
def run_detail(name: str, s: Studio = Depends(studio)):
    return runs.run_detail(runs.run_dir(s.runs_dir, name))


@router.post("/api/runs/{name}/stop")
def stop(name: str, s: Studio = Depends(studio)):
    if not runs.stop_run(runs.run_dir(s.runs_dir, name)):
        raise runs.WebUIError(f"run {name!r} is not running")
    return {"stopping": name}


@router.get("/runs/{name}/report")
def report(name: str, s: Studio = Depends(studio)):
    from aift.eval.report import build_report

    path = runs.run_dir(s.runs_dir, name)
    return FileResponse(build_report([path], path / "report"), media_type="text/html")
