"""Invariance tests of the loop's math (fp32, CPU, tiny model): accumulation, packing, schedule."""

from __future__ import annotations

import pytest
import torch

from aift import FullFinetuningTrainer, LoRAConfig, LoRAFinetuningTrainer
from aift.training.backends import resolve_precision
from aift.training.optimizers import linear_warmup_then_decay

TEXTS = [f"質問: {i} たす {i} は?\n回答: {2 * i} です。" + "ね" * (i % 5) for i in range(8)]


def _losses(config, lora: bool = False) -> tuple[list[float], torch.nn.Module]:
    import json
    from pathlib import Path

    trainer = (
        LoRAFinetuningTrainer(config.model_name, LoRAConfig(lora_dropout=0.0), config)
        if lora
        else FullFinetuningTrainer(config.model_name, config)
    )
    model = trainer.train(train_texts=TEXTS)
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"], model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_8_micro_batches_of_1_equal_1_batch_of_8(fp32_config, tmp_path, lora):
    one_by_eight, model_a = _losses(
        fp32_config(batch_size=1, gradient_accumulation_steps=8, packing=False, output_dir=str(tmp_path / "a")), lora
    )
    eight_by_one, model_b = _losses(
        fp32_config(batch_size=8, gradient_accumulation_steps=1, packing=False, output_dir=str(tmp_path / "b")), lora
    )
    assert len(one_by_eight) == 3
    assert one_by_eight == pytest.approx(eight_by_one, abs=1e-5)
    assert one_by_eight[-1] < one_by_eight[0]  # it learns
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("segment_attention", [True, False], ids=["segment-attention", "sdpa-4d-mask"])
def test_packed_rows_train_like_padded_batches(fp32_config, tmp_path, segment_attention):
    packed_config = fp32_config(
        batch_size=8, packing=True, max_length=128, segment_attention=segment_attention, output_dir=str(tmp_path / "p")
    )
    packed, _ = _losses(packed_config)
    padded, _ = _losses(fp32_config(batch_size=8, packing=False, max_length=128, output_dir=str(tmp_path / "u")))
    # All examples fit in one micro-batch either way, so each step sees the same tokens.
    assert packed == pytest.approx(padded, abs=1e-4)


def test_warmup_then_linear_decay_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = linear_warmup_then_decay(optimizer, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert scheduler.get_last_lr()[0] == 0.0


def test_precision_choice_on_cpu(fp32_config, caplog, native_cpu_bf16):
    assert resolve_precision(fp32_config(), "cpu") == "no"
    assert resolve_precision(fp32_config(bf16=True), "cpu") == "bf16"
    with caplog.at_level("INFO"):
        assert resolve_precision(fp32_config(fp16=True), "cpu") == "bf16"
    assert "fp16 was requested on a CPU" in caplog.text


def test_a_cpu_without_bf16_instructions_trains_in_fp32(fp32_config, monkeypatch, caplog):
    """bf16 emulated in software is far slower than fp32: the run says so and autocasts nothing."""
    from aift.training import backends
    from aift.utils import gpu

    monkeypatch.setattr(gpu, "cpu_has_native_bf16", lambda: False)
    backends._note_emulated_bf16.cache_clear()
    with caplog.at_level("INFO"):
        assert resolve_precision(fp32_config(bf16=True), "cpu") == "no"
        assert resolve_precision(fp32_config(fp16=True), "cpu") == "no"
    assert caplog.text.count("this CPU has no bf16 instructions") == 1  # said once
    config = fp32_config(bf16=True, frozen_base_bf16=True)
    assert not backends.holds_frozen_base_in_bf16(config, "cpu")
    monkeypatch.setattr(gpu, "cpu_has_native_bf16", lambda: True)
    assert backends.holds_frozen_base_in_bf16(config, "cpu")


def test_bf16_autocast_and_gradient_checkpointing_train(fp32_config, native_cpu_bf16):
    losses, _ = _losses(fp32_config(bf16=True, gradient_checkpointing=True, max_steps=4), lora=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
