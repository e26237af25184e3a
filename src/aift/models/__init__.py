"""Models: the registry, loading by name, the embedded default and the run folder (JapaneseModel is in aift.inference).

The names below are imported on first use: loading needs torch, and `aift.models.run_folder` (the run
folder's layout, read by the report and the web UI) must not load it.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "ModelNotAvailableError": "aift.models.loading",
    "EMBEDDED_MODEL": "aift.models.registry",
    "SUPPORTED_MODELS": "aift.models.registry",
    "ModelSpec": "aift.models.registry",
}

__all__ = ["EMBEDDED_MODEL", "SUPPORTED_MODELS", "ModelNotAvailableError", "ModelSpec"]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'aift.models' has no attribute {name!r}")
