"""Parity: with packing off, aift's first 10 losses match a plain transformers Trainer run (same model/data/seed)."""

from __future__ import annotations

import pytest
import torch

from aift import FullFinetuningTrainer

TEXTS = ["質問: 日本の首都は?\n回答: 東京です。", "Q: 2+2?\nA: 4.", "こんにちは、元気ですか。", "The sky is blue."]


@pytest.mark.slow
def test_first_10_losses_match_transformers_trainer(fp32_config, tmp_path, read_metrics, tiny_model_dir, tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    hp = dict(batch_size=4, max_steps=10, warmup_steps=2, learning_rate=1e-3, packing=False, max_grad_norm=1.0)
    config = fp32_config(**hp)
    FullFinetuningTrainer(str(tiny_model_dir), config).train(train_texts=TEXTS)
    ours = [r["loss"] for r in read_metrics(config.output_dir)]

    eos = tokenizer.eos_token
    rows = [tokenizer(t + eos, add_special_tokens=False)["input_ids"] for t in TEXTS]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        max_steps=10,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        optim="adamw_torch",
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    assert len(ours) == len(theirs) == 10
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert ours[-1] < ours[0] - 0.1  # both actually learn
