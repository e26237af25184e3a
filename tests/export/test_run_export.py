"""run_export: the one merge -> write -> verify that `aift export` and the web UI call, with one quant list."""

from __future__ import annotations

import json

import pytest

from aift.cli import build_parser
from aift.errors import AiftError
from aift.export.gguf_writer import quant_types
from aift.export.run import GGUF_QUANTS, run_export


def test_an_adapter_is_merged_written_and_verified_leaving_no_temp_folder(tmp_path, tiny_adapter):
    result = run_export(tiny_adapter, tmp_path / "tiny.f32.gguf", quant="f32")
    assert result.path == tmp_path / "tiny.f32.gguf" and result.path.is_file()
    assert result.format == "gguf" and result.quant == "f32" and result.size_mb > 0
    assert result.check is not None and result.check["greedy_match"] and result.passed
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.f32.gguf"]  # the merge went to a temp folder


def test_without_verify_there_is_no_check(tmp_path, tiny_merged):
    result = run_export(tiny_merged, tmp_path / "m.gguf", quant="q8_0", verify=False)
    assert result.check is None and result.passed and result.path.is_file()


def test_safetensors_of_an_adapter_is_its_merge(tmp_path, tiny_adapter):
    result = run_export(tiny_adapter, tmp_path / "plain", format="safetensors", dtype="fp32")
    assert result.format == "safetensors" and (result.path / "model.safetensors").is_file()
    assert json.loads((result.path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_bad_format_and_output_are_refused_before_any_work(tmp_path, tiny_merged):
    with pytest.raises(AiftError, match="gguf, safetensors"):
        run_export(tiny_merged, tmp_path / "x", format="onnx")
    with pytest.raises(AiftError, match=r"\.gguf"):
        run_export(tiny_merged, tmp_path / "x.bin")
    assert list(tmp_path.iterdir()) == []


def test_one_quant_list_for_the_writer_the_cli_and_the_web_ui():
    assert tuple(quant_types()) == GGUF_QUANTS
    quant = next(a for a in build_parser("export")._actions if "--quant" in a.option_strings)
    assert tuple(quant.choices) == GGUF_QUANTS
