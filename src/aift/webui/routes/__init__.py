"""The web UI's JSON API, one router per view: data, train, runs, chat, export (app.py mounts them).

Every route reads the studio's folders from :class:`Studio` (``Depends(studio)``), set once by create_app.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from aift.webui.data import DataRoots

if TYPE_CHECKING:
    from aift.webui.routes.chat import ChatModels


@dataclass
class Studio:
    """What the routes share: the runs folder, the data roots, and the models loaded for chat."""

    runs_dir: Path
    roots: DataRoots
    chat_models: ChatModels


def studio(request: Request) -> Studio:
    return request.app.state.studio
