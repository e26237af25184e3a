"""Chat view: a streamed answer of a run's final model (models loaded once, a few kept in memory)."""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import StreamingResponse

from aift.webui import runs
from aift.webui.routes import Studio, studio

log = logging.getLogger(__name__)
router = APIRouter()
_CHAT_CACHE_SIZE = 2  # loaded models kept for chat (each is a whole model in memory)


class ChatModels:
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


@router.post("/api/runs/{name}/chat")
def chat(name: str, body: dict = Body(...), s: Studio = Depends(studio)):
    from aift.inference.runner import GenerationSettings

    final = runs.final_dir(runs.run_dir(s.runs_dir, name))
    messages = _messages(body.get("messages"))
    settings = GenerationSettings(
        max_new_tokens=_bounded_int(body.get("max_new_tokens", 128), "max_new_tokens", 1, 2048),
        greedy=bool(body.get("greedy", True)),
        temperature=float(body.get("temperature", 0.7)),
    )
    loaded = s.chat_models.get(final)
    return StreamingResponse(_stream(loaded, messages, settings), media_type="text/plain; charset=utf-8")


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
