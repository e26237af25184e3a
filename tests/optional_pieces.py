"""The one way a test says it needs an optional piece (DeepSpeed, llama.cpp, a system package).

Outside CI a missing piece skips the test with its one-line reason: users may go without it. Under CI=true,
where every piece is installed, a missing one fails the test instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def missing(reason: str) -> NoReturn:
    """Skips the test (or, at import, its module) with the reason; fails it under CI=true."""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: every optional piece must be installed)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_optional(module: str, reason: str) -> ModuleType:
    """The imported module, or missing(reason)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(reason)


def require(present: bool, reason: str) -> None:
    """missing(reason) unless present."""
    if not present:
        missing(reason)
