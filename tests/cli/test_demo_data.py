"""`aift demo` finds its sample data in a source checkout, and says what to do from an installed wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

from aift.cli import demo
from aift.errors import NotAvailableError

REPO = Path(__file__).resolve().parents[2]


def test_found_in_the_checkout_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.find_demo_data() == REPO / "data" / "ja_qa.json"


def test_from_a_wheel_the_message_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "_source_checkout", lambda: None)  # what an installed wheel sees
    with pytest.raises(NotAvailableError, match="pass --data PATH"):
        demo.find_demo_data()
    given = tmp_path / "qa.json"
    given.write_text("[]")
    assert demo.find_demo_data(str(given)) == given
    with pytest.raises(NotAvailableError, match="no such file"):
        demo.find_demo_data(str(tmp_path / "missing.json"))
