"""Data view: the datasets below the data roots, their preview, and `aift prepare` (aift.webui.prepare)."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends

from aift.webui import data as webdata
from aift.webui import prepare as webprepare
from aift.webui.routes import Studio, studio

router = APIRouter()


@router.get("/api/datasets")
def datasets(s: Studio = Depends(studio)):
    return s.roots.listing()


@router.get("/api/preview")
def preview(path: str, n: int = 3, split: str = "train", s: Studio = Depends(studio)):
    return webdata.preview(s.roots.resolve(path), n, split)


@router.post("/api/prepare")
def prepare(body: dict = Body(...), s: Studio = Depends(studio)):
    out = webprepare.prepare(
        s.roots, body.get("source_path", ""), body.get("name", ""), dict(body.get("options") or {})
    )
    return {"path": str(out)}
