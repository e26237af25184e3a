"""A missing optional piece skips a test with its reason, except under CI=true, where it fails it."""

from __future__ import annotations

from pathlib import Path

import pytest
from optional_pieces import import_optional, require

TESTS = Path(__file__).resolve().parent


def test_a_missing_piece_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no such piece"):
        import_optional("aift_no_such_module", "no such piece")
    with pytest.raises(pytest.skip.Exception, match="chromium is absent"):
        require(False, "chromium is absent")
    require(True, "present: nothing happens")
    assert import_optional("json", "the standard library").dumps([1]) == "[1]"


@pytest.mark.parametrize("value", ["true", "TRUE"])
def test_a_missing_piece_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="no such piece .CI=true"):
        import_optional("aift_no_such_module", "no such piece")
    with pytest.raises(pytest.fail.Exception, match="chromium is absent"):
        require(False, "chromium is absent")


def test_every_test_skips_a_missing_piece_through_the_helper():
    raw = [
        p.name
        for p in TESTS.rglob("*.py")
        if p.name != Path(__file__).name and "importorskip(" in p.read_text(encoding="utf-8")
    ]
    assert raw == [], f"use optional_pieces.import_optional, which fails under CI=true: {raw}"
