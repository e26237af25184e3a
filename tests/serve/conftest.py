"""Fixtures of the serve tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread, as the serve subprocess tests have: with two, a small model's decode step spins at
    every barrier on a machine running other work (~5x slower, measured); the answers do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
