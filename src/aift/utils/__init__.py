"""Device, process and file helpers.

The GPU helpers are imported on first use: they need torch, and `aift.utils.files` must stay light (the CLI, the
report and the web UI read run folders without loading torch).
"""

from __future__ import annotations

import importlib

_GPU_NAMES = (
    "clear_gpu_memory",
    "get_available_device",
    "get_gpu_memory_info",
    "optimize_model_for_gpu",
    "set_memory_fraction",
)

__all__ = list(_GPU_NAMES)


def __getattr__(name: str):
    if name in _GPU_NAMES:
        return getattr(importlib.import_module("aift.utils.gpu"), name)
    raise AttributeError(f"module 'aift.utils' has no attribute {name!r}")
