"""A run on disk: which folder is what (run dir, final/, adapter, fine-tuned), aift_meta.json, and open_run."""

from __future__ import annotations

import json

import pytest
import torch
from post_helpers import PROBE, base_plus_adapter, make_lora_adapter

from aift.models.run_folder import (
    RunFolderError,
    RunTarget,
    open_run,
    read_meta,
    resolve_run,
    write_meta,
)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A training output dir whose final/ is a LoRA adapter on the tiny model (chatml, as aift_meta.json says)."""
    run = tmp_path_factory.mktemp("run")
    make_lora_adapter(tiny_model_dir, run / "final", prompt_format="chatml")
    return run


def test_resolve_run(tmp_path, tiny_model_dir, lora_run):
    assert resolve_run(str(lora_run)).adapter == str(lora_run / "final")
    assert resolve_run(str(lora_run)).base == str(tiny_model_dir)
    assert resolve_run("m", adapter=str(lora_run)) == RunTarget(base="m", adapter=str(lora_run / "final"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "aift_meta.json").write_text(json.dumps({"base_model": "base-x", "method": "full"}))
    assert resolve_run(str(full)) == RunTarget(base="base-x", finetuned=str(full))
    assert not resolve_run(str(tiny_model_dir)).has_finetune
    # a quantized copy of a plain model records no base: it is a model of its own
    (full / "aift_meta.json").write_text(json.dumps({"quantized_from": "somewhere"}))
    assert resolve_run(str(full)) == RunTarget(base=str(full))
    with pytest.raises(RunFolderError, match="no adapter_config.json"):
        resolve_run("m", adapter=str(tmp_path))


def test_meta_is_written_once_with_the_version_and_read_back(tmp_path):
    from aift import __version__

    assert read_meta(tmp_path) == {}
    write_meta(tmp_path, {"base_model": "b", "prompt_format": "日本語"})
    assert read_meta(tmp_path) == {"base_model": "b", "prompt_format": "日本語", "aift_version": __version__}
    (tmp_path / "aift_meta.json").write_text("{oops")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        read_meta(tmp_path)


@torch.inference_mode()
def test_open_run_puts_the_adapter_on_its_base_merged_or_not(tiny_model_dir, lora_run, tokenizer):
    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reference = base_plus_adapter(tiny_model_dir, lora_run / "final")(ids).logits
    apart = open_run(lora_run, device="cpu", dtype=torch.float32)
    merged = open_run(lora_run, device="cpu", dtype=torch.float32, merge=True)
    assert hasattr(apart.model, "disable_adapter") and not hasattr(merged.model, "disable_adapter")
    assert apart.meta["prompt_format"] == "chatml" and apart.tokenizer.pad_token is not None
    torch.testing.assert_close(apart.model(ids).logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.model(ids).logits, reference, atol=1e-4, rtol=1e-4)


def test_tokens_added_in_training_resize_the_base(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<|新しい|>"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "final", save_embedding_layers=True)  # training saves them like this
    tokenizer.save_pretrained(tmp_path / "final")
    write_meta(tmp_path / "final", {"base_model": str(tiny_model_dir), "method": "lora"})
    run = open_run(tmp_path, device="cpu", dtype=torch.float32, merge=True)
    assert run.model.get_input_embeddings().num_embeddings == len(tokenizer) == len(run.tokenizer)
