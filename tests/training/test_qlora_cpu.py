"""QLoRA on a CPU: an evaluation during training must not cut the gradients through the 4-bit base."""

from __future__ import annotations

import torch

from aift import LoRAConfig, LoRAFinetuningTrainer

TEXTS = [f"質問: {a}+{b}は? 回答: {a + b}です。" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]


def _adapter_after_training(fp32_config, tiny_model_dir, name, eval_texts):
    config = fp32_config(max_steps=2, eval_steps=1, output_dir=str(fp32_config().output_dir) + name)
    trainer = LoRAFinetuningTrainer(str(tiny_model_dir), LoRAConfig(r=4, lora_dropout=0.0, use_qlora=True), config)
    model = trainer.train(train_texts=TEXTS, eval_texts=eval_texts)
    return {k: v.detach().float().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_an_eval_before_and_during_training_leaves_qlora_training_unchanged(fp32_config, tiny_model_dir):
    with_eval = _adapter_after_training(fp32_config, tiny_model_dir, "-eval", TEXTS[:2])
    without = _adapter_after_training(fp32_config, tiny_model_dir, "-plain", None)
    assert with_eval.keys() == without.keys() and with_eval
    for name, value in without.items():
        torch.testing.assert_close(with_eval[name], value, atol=1e-6, rtol=1e-5, msg=name)
    # The first layer's adapters trained at all: their gradient passes through the 4-bit layers above them.
    first = [v for k, v in without.items() if ".layers.0." in k and "lora_B" in k]
    assert first and all(v.abs().sum() > 0 for v in first)
