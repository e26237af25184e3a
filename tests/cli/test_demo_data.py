"""`aift demo` reads its sample data from the package (so it runs from an installed wheel), a copy of data/."""

from __future__ import annotations

from pathlib import Path

import pytest

import aift
from aift.cli import demo
from aift.errors import NotAvailableError

REPO = Path(__file__).resolve().parents[2]


def test_the_bundled_data_is_package_data_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = demo.find_demo_data()
    assert found.is_file() and found.is_relative_to(Path(aift.__file__).parent)


def test_the_bundled_data_is_the_repository_copy():
    assert demo.DEMO_DATA.read_bytes() == (REPO / "data" / "ja_qa.json").read_bytes(), (
        f"{demo.DEMO_DATA} is a copy of data/ja_qa.json (itself made by data/make_formats.py): copy it again"
    )


def test_data_flag(tmp_path):
    given = tmp_path / "qa.json"
    given.write_text("[]")
    assert demo.find_demo_data(str(given)) == given
    with pytest.raises(NotAvailableError, match="no such file"):
        demo.find_demo_data(str(tmp_path / "missing.json"))
