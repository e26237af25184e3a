"""Merging a LoRA adapter: the merged folder computes what base + adapter computes."""

from __future__ import annotations

import json

import pytest
import torch
from post_helpers import PROBE, base_plus_adapter
from transformers import AutoModelForCausalLM

from aift.errors import AiftError
from aift.export.merge import merge_adapter


@torch.inference_mode()
def test_merged_logits_equal_base_plus_adapter(tiny_model_dir, tiny_adapter, tiny_merged, tokenizer):
    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reference = base_plus_adapter(tiny_model_dir, tiny_adapter)(ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(ids).logits
    merged_model = AutoModelForCausalLM.from_pretrained(tiny_merged, dtype=torch.float32).eval()
    merged = merged_model(ids).logits
    assert (reference - base).abs().max() > 1e-2, "the adapter must change the model, or this test proves nothing"
    assert (merged - reference).abs().max() < 1e-4
    assert not any("lora" in name for name, _ in merged_model.named_parameters())


def test_merged_folder_is_plain_and_keeps_the_format(tiny_merged, tiny_adapter, tiny_model_dir):
    names = {p.name for p in tiny_merged.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "aift_meta.json"} <= names
    assert "adapter_config.json" not in names
    meta = json.loads((tiny_merged / "aift_meta.json").read_text())
    assert meta["prompt_format"] == "chatml" and meta["method"] == "merged"
    assert meta["base_model"] == str(tiny_model_dir) and meta["merged_from"]["adapter"] == str(tiny_adapter)
    assert not list(tiny_merged.parent.glob(".*tmp*")), "no temp folder left behind"


def test_bf16_merge_saves_bf16(tmp_path, tiny_adapter):
    out = merge_adapter(tiny_adapter, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_qlora_adapter_merges_into_the_full_precision_base(tmp_path, tiny_model_dir, tiny_adapter, tokenizer):
    qlora = tmp_path / "qlora"
    qlora.mkdir()
    for f in tiny_adapter.iterdir():
        (qlora / f.name).write_bytes(f.read_bytes())
    meta = json.loads((qlora / "aift_meta.json").read_text())
    (qlora / "aift_meta.json").write_text(json.dumps({**meta, "method": "qlora"}))
    out = merge_adapter(qlora, tmp_path / "merged", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert json.loads((out / "aift_meta.json").read_text())["merged_from"]["method"] == "qlora"


def test_bad_inputs_are_clear(tmp_path, tiny_adapter):
    with pytest.raises(AiftError, match="no adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(AiftError, match="not empty"):
        merge_adapter(tiny_adapter, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(AiftError, match="unknown dtype"):
        merge_adapter(tiny_adapter, tmp_path / "x", dtype="int3")
