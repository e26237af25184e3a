"""Every performance lever gives the plain path's loss and gradients (the benchmark measures their speed)."""

from __future__ import annotations

import copy
import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():  # non-zero B so that every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach().float(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_frozen_base_in_bf16_matches_the_fp32_base_under_autocast(tiny_lora, packed_batch):
    """Autocast runs the base's matmuls in bf16 either way; holding the base in bf16 only skips the casts.
    What differs is the residual stream (bf16 instead of fp32), so the match is within bf16 tolerance."""
    from aift.lora.model import hold_frozen_in_bf16

    held = copy.deepcopy(tiny_lora)
    hold_frozen_in_bf16(held)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in held.parameters())
    ref_loss, ref_grads = loss_and_grads(tiny_lora, packed_batch)
    loss, grads = loss_and_grads(held, packed_batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for k, g in grads.items():
        assert g.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[k].flatten(), dim=0)
        assert cos > 0.99, (k, cos)


def test_peft_input_cast_off_under_autocast_changes_nothing(tiny_lora, packed_batch):
    """Under autocast peft's cast of bf16 activations to the adapters' fp32 is undone by autocast at once:
    turning it off gives bit-identical loss and gradients (and saves two copies per adapted layer)."""
    from peft.helpers import disable_input_dtype_casting

    from aift.lora.model import hold_frozen_in_bf16

    held = copy.deepcopy(tiny_lora)
    hold_frozen_in_bf16(held)
    ref_loss, ref_grads = loss_and_grads(held, packed_batch)
    with disable_input_dtype_casting(held):
        loss, grads = loss_and_grads(held, packed_batch)
    assert torch.equal(loss, ref_loss)
    for k, g in grads.items():
        assert torch.equal(g, ref_grads[k]), k


def train_tiny(tiny_model_dir, tmp_path, name, **levers) -> list[float]:
    """A few LoRA steps of aift's loop on random token rows; returns the per-step losses."""
    from aift.config import LoRAConfig, TrainingConfig
    from aift.training.trainers import LoRAFinetuningTrainer

    g = torch.Generator().manual_seed(2)
    # Lengths that pack into four full rows of 64: one shape, so torch.compile compiles once.
    lengths = (50, 40, 37, 33, 31, 27, 24, 14)
    data = [{"input_ids": torch.randint(0, 49152, (n,), generator=g).tolist()} for n in lengths]
    for ex in data:
        ex["labels"] = [-100] * 5 + ex["input_ids"][5:]  # a masked prompt
    config = TrainingConfig(
        output_dir=str(tmp_path / name), learning_rate=1e-3, batch_size=1, gradient_accumulation_steps=2,
        num_epochs=1, warmup_steps=0, eval_steps=0, save_steps=0, logging_steps=1, fp16=False,
        gradient_checkpointing=False, max_length=64, report_to=["none"], seed=3, **levers,
    )  # fmt: skip
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    LoRAFinetuningTrainer(str(tiny_model_dir), lora, config, train_dataset=data).train()
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]


def test_loop_with_fused_loss_trains_like_the_plain_loss(tiny_model_dir, tmp_path):
    plain = train_tiny(tiny_model_dir, tmp_path, "plain", loss_chunk_size=0, bf16=False)
    fused = train_tiny(tiny_model_dir, tmp_path, "fused", loss_chunk_size=16, bf16=False)
    assert len(plain) >= 2
    assert fused == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow
def test_loop_with_torch_compile_trains_like_without(tiny_model_dir, tmp_path):
    plain = train_tiny(tiny_model_dir, tmp_path, "eager", loss_chunk_size=16, bf16=False)
    compiled = train_tiny(tiny_model_dir, tmp_path, "compiled", loss_chunk_size=16, bf16=False, torch_compile=True)
    assert compiled == pytest.approx(plain, rel=1e-4)
