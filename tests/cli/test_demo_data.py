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


def _autocast_seen_by_the_model(model_dir, tokenizer) -> set[bool]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seen: set[bool] = set()
    model.register_forward_pre_hook(lambda module, args: seen.add(torch.is_autocast_enabled("cpu")))
    answer = demo.greedy_answer(model, tokenizer, "日本の首都は", max_new_tokens=2)
    assert isinstance(answer, str)
    return seen


def test_the_demo_answers_in_fp32_where_bf16_is_emulated(tiny_model_dir, tokenizer, monkeypatch):
    from aift.utils import gpu

    monkeypatch.setattr(gpu, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU, as this machine's
    assert _autocast_seen_by_the_model(tiny_model_dir, tokenizer) == {False}


def test_the_demo_answers_under_bf16_autocast_where_the_cpu_has_it(tiny_model_dir, tokenizer, native_cpu_bf16):
    assert _autocast_seen_by_the_model(tiny_model_dir, tokenizer) == {True}
