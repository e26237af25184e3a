"""Merging a QLoRA adapter: base_weights="dequantized" reproduces the 4-bit model the adapter was trained with.

The reference is the 4-bit PeftModel run in train mode with lora_dropout=0: that is the function training
computes. (In eval mode, bitsandbytes' CPU kernel repacks 4-bit weights for a bf16 AVX-512 path, an
inference-only approximation; training never sees it.)
"""

from __future__ import annotations

import json

import pytest
import torch
from post_helpers import LORA_TARGETS, PROBE
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from aift.cli import main
from aift.config import LoRAConfig, TrainingConfig, to_yaml
from aift.errors import AiftError
from aift.export.merge import QuantSettings, merge_adapter, quant_settings

TOLERANCE = 1e-4  # relative, fp32 compute


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _logits(folder, ids) -> torch.Tensor:
    with torch.inference_mode():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits


@pytest.fixture(scope="module")
def probe_ids(tokenizer):
    return tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, tiny_model_dir, tokenizer, probe_ids):
    """A QLoRA adapter (random nonzero B) on the 4-bit NF4 tiny model with fp32 compute, and its trained logits."""
    from peft import LoraConfig, get_peft_model

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"}
    )
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        reference = model.train()(probe_ids).logits
    out = tmp_path_factory.mktemp("qlora-run") / "final"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    quantization = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    meta = {"base_model": str(tiny_model_dir), "method": "qlora", "prompt_format": "chatml", "max_length": 64}
    (out / "aift_meta.json").write_text(json.dumps({**meta, "quantization": quantization}), encoding="utf-8")
    return out, reference


@pytest.fixture(scope="module")
def merged_dequantized(tmp_path_factory, qlora):
    return merge_adapter(qlora[0], tmp_path_factory.mktemp("deq") / "out", dtype="fp32", base_weights="dequantized")


def test_dequantized_merge_reproduces_the_trained_4bit_model(tmp_path, qlora, merged_dequantized, probe_ids):
    adapter, reference = qlora
    original = merge_adapter(adapter, tmp_path / "original", dtype="fp32", base_weights="original")
    assert _relative(_logits(merged_dequantized, probe_ids), reference) < TOLERANCE
    gap = _relative(_logits(original, probe_ids), reference)
    assert gap > 10 * TOLERANCE, f"the original-weights merge should visibly differ from the trained model ({gap})"
    assert json.loads((original / "aift_meta.json").read_text())["merged_from"]["base_weights"] == "original"


def test_dequantized_folder_is_plain(merged_dequantized):
    config = json.loads((merged_dequantized / "config.json").read_text())
    assert "quantization_config" not in config
    meta = json.loads((merged_dequantized / "aift_meta.json").read_text())
    assert meta["merged_from"] == {
        "adapter": meta["merged_from"]["adapter"],
        "method": "qlora",
        "base_weights": "dequantized",
    }
    assert meta["prompt_format"] == "chatml"


def test_cli_flag_round_trip(tmp_path, qlora, merged_dequantized, probe_ids, capsys):
    out = tmp_path / "cli"
    code = main(
        ["merge", "--adapter", str(qlora[0]), "--output", str(out), "--dtype", "fp32", "--base-weights", "dequantized"]
    )
    assert code == 0 and "dequantized" in capsys.readouterr().out
    assert torch.equal(_logits(out, probe_ids), _logits(merged_dequantized, probe_ids))
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--adapter", str(qlora[0]), "--output", str(out), "--base-weights", "4bit"])
    assert exit_info.value.code == 2


def test_settings_come_from_the_run_config_when_meta_has_none(tmp_path, tiny_adapter):
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "aift_meta.json").write_text(json.dumps({"method": "qlora"}))
    yaml_text = to_yaml(TrainingConfig(), LoRAConfig(use_qlora=True, qlora_4bit=False))
    (final.parent / "config.yaml").write_text(yaml_text)
    assert quant_settings(final).bits == 8
    (final.parent / "config.yaml").unlink()
    assert quant_settings(final) == QuantSettings()  # aift's QLoRA defaults: 4-bit NF4, double quant
    with pytest.raises(AiftError, match="full-precision base"):
        merge_adapter(tiny_adapter, tmp_path / "out", base_weights="dequantized")  # a plain LoRA adapter
    with pytest.raises(AiftError, match="base_weights must be one of"):
        merge_adapter(tiny_adapter, tmp_path / "out", base_weights="4bit")


def test_a_real_aift_qlora_run_merges_to_its_trained_model(tmp_path, tiny_model_dir, probe_ids):
    """aift's own QLoRA training (settings read back from the aift_meta.json it writes), fp32 compute."""
    from peft import PeftModel

    from aift.inference.japanese import JapaneseModel
    from aift.models.loading import load_causal_lm
    from aift.training.trainers import LoRAFinetuningTrainer

    texts = ["<|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\nはい、こんにちは。<|im_end|>\n"] * 4
    config = TrainingConfig(
        model_name=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=2, learning_rate=5e-2,
        batch_size=2, gradient_accumulation_steps=1, warmup_steps=0, eval_steps=0, save_steps=0, logging_steps=1,
        report_to=["none"], max_length=64, gradient_checkpointing=False, bf16=False, fp16=False,
    )  # fmt: skip
    holder = JapaneseModel(str(tiny_model_dir), device="cpu", torch_dtype=torch.float32)  # 4-bit with fp32 compute
    LoRAFinetuningTrainer(holder, LoRAConfig(r=4, use_qlora=True, lora_dropout=0.0), config).train(train_texts=texts)
    final = tmp_path / "run" / "final"
    settings = quant_settings(final)
    assert settings.source.endswith("aift_meta.json")
    assert (settings.bits, settings.quant_type, settings.double_quant, settings.compute_dtype) == (
        4,
        "nf4",
        True,
        "fp32",
    )
    adapter = load_file(final / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name), "training must move B"
    trained = PeftModel.from_pretrained(
        load_causal_lm(str(tiny_model_dir), load_in_4bit=True, dtype=torch.float32), final
    )
    with torch.no_grad():
        reference = trained.train()(probe_ids).logits
    merged = merge_adapter(final, tmp_path / "merged", dtype="fp32", base_weights="dequantized")
    assert _relative(_logits(merged, probe_ids), reference) < TOLERANCE
