"""Builders for the post-training tests (quant/, export/, inference/, cli/test_post_cli.py): LoRA adapters
made directly with peft, with random nonzero B so that merging visibly changes the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_adapter(base_dir: Path, out_dir: Path, prompt_format: str = "chatml", seed: int = 0) -> Path:
    """A LoRA adapter on `base_dir` with random A and B (init_lora_weights=False) and aift_meta.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)  # as training saves it beside the adapter
    meta = {"base_model": str(base_dir), "method": "lora", "prompt_format": prompt_format, "max_length": 64}
    (Path(out_dir) / "aift_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return Path(out_dir)


def base_plus_adapter(base_dir: Path, adapter_dir: Path):
    """The unmerged PeftModel in fp32, eval mode: the reference a merge must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


PROBE = "<|im_start|>user\n日本の首都はどこですか？ What is 12+30?<|im_end|>\n<|im_start|>assistant\n"
