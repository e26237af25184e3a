"""Serving models to many clients: a batching generation engine and an OpenAI-compatible HTTP API on it.

from aift.serve import Engine, create_app, load_served_models
app = create_app(Engine(load_served_models("smollm2-135m-instruct")))

The HTTP app needs the `serve` extra (fastapi, uvicorn); the engine does not.
"""

from __future__ import annotations

from aift.serve.engine import Engine, Event, Handle, Sampling
from aift.serve.models import ServedModel, load_served_models

__all__ = ["Engine", "Event", "Handle", "Sampling", "ServedModel", "create_app", "load_served_models"]


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app for an engine (see aift.serve.app.create_app)."""
    from aift.serve.app import create_app as create

    return create(engine, api_key=api_key)
