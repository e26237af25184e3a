"""QuantizationOptimizer on the tiny model: saved folders load again, the benchmark measures real differences."""

from __future__ import annotations

import logging
import math

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from aift.inference.japanese import JapaneseModel
from aift.quant.optimizer import QuantizationOptimizer

TEXTS = ["日本の首都は東京です。", "The capital of France is Paris."]


@pytest.fixture(scope="module")
def optimizer(tiny_model_dir):
    return QuantizationOptimizer(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def q4(optimizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4") / "model"
    return out, optimizer.quantize_to_4bit(out)


def _linear_types(model) -> set[type]:
    return {type(m) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}


def test_4bit_folder_loads_again_everywhere(q4, caplog):
    out, model = q4
    assert _linear_types(model) == {bnb.nn.Linear4bit}
    config = model.config.quantization_config.to_dict()
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    # float16 compute was asked (the default) but this is a CPU: bfloat16 is used, as the note says.
    assert config["bnb_4bit_compute_dtype"] == "bfloat16"
    again = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    assert _linear_types(again) == {bnb.nn.Linear4bit}
    japanese = JapaneseModel(str(out), device="cpu").load()
    assert _linear_types(japanese.model) == {bnb.nn.Linear4bit}
    assert isinstance(japanese.generate_japanese("こんにちは", max_new_tokens=3, do_sample=False), str)


def test_cpu_float16_note(optimizer, caplog):
    with caplog.at_level(logging.INFO, logger="aift.quant.optimizer"):
        assert optimizer._compute_dtype(torch.float16) == torch.bfloat16
    assert "bfloat16" in caplog.text
    assert optimizer._compute_dtype(torch.float32) == torch.float32


def test_8bit_folder_loads_again(optimizer, tmp_path):
    model = optimizer.quantize_to_8bit(tmp_path / "q8", llm_int8_threshold=5.0)
    assert _linear_types(model) == {bnb.nn.Linear8bitLt}
    assert model.config.quantization_config.to_dict()["llm_int8_threshold"] == 5.0
    assert _linear_types(AutoModelForCausalLM.from_pretrained(tmp_path / "q8")) == {bnb.nn.Linear8bitLt}


def test_benchmark_reports_speed_size_and_quality(optimizer, q4):
    report = optimizer.benchmark_quantization(optimizer.load_original(), q4[1], TEXTS, num_runs=3)
    for side in ("original", "quantized"):
        stats = report[side]
        assert stats["latency_ms_p50"] <= stats["latency_ms_p95"]
        assert stats["generation_tokens_per_s"] > 0 and math.isfinite(stats["perplexity"])
        assert stats["disk_bytes"] > 0
    # Embeddings stay unquantized (bf16 instead of fp32), so the tiny model shrinks by about 2x, not 8x.
    assert report["size_ratio"] > 1.5 and report["memory_ratio"] > 1.5
    assert report["quantized"]["disk_bytes"] < report["original"]["disk_bytes"]
    assert 0 < report["kl_divergence"] < 5
    assert report["original"]["perplexity"] != report["quantized"]["perplexity"]


def test_bad_quant_type(optimizer, tmp_path):
    with pytest.raises(ValueError, match="nf4 or fp4"):
        optimizer.quantize_to_4bit(tmp_path / "x", quant_type="int4")
