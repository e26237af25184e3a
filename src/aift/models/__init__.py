"""Models: the registry, loading by name, the embedded default, JapaneseModel, and the run folder.

The names below are imported on first use: JapaneseModel needs torch, and `aift.models.run_folder` (the run
folder's layout, read by the report and the web UI) must not load it.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "BaseModel": "aift.models.japanese",
    "JapaneseModel": "aift.models.japanese",
    "ModelNotAvailableError": "aift.models.loading",
    "EMBEDDED_MODEL": "aift.models.registry",
    "SUPPORTED_MODELS": "aift.models.registry",
    "ModelSpec": "aift.models.registry",
}

__all__ = ["EMBEDDED_MODEL", "SUPPORTED_MODELS", "BaseModel", "JapaneseModel", "ModelNotAvailableError", "ModelSpec"]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'aift.models' has no attribute {name!r}")
