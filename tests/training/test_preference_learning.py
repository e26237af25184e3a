"""A short LoRA DPO run of the embedded model learns a preference it can generalise: the larger number is right.

The base SmolLM2-135M-Instruct ranks the right answer of a held-out pair above the wrong one about 60% of
the time (measured: 0.59 on these 32 pairs); 16 DPO steps on 32 other pairs bring it to about 0.97.
"""

from __future__ import annotations

import json
import random

import pytest
import torch


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.sample(range(10, 99), 2)
        pairs.append(
            {"prompt": f"Which number is larger, {a} or {b}?", "chosen": str(max(a, b)), "rejected": str(min(a, b))}
        )
    return pairs


def _ranked_right(model, objective, rows) -> float:
    from aift.training.objectives.logps import sequence_logps

    batch = objective.collate(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _ = sequence_logps(logits, batch["labels"])
    n = len(rows)
    return (logps[:n] > logps[n:]).float().mean().item()


@pytest.mark.slow
def test_lora_dpo_ranks_held_out_right_answers_above_wrong_ones(tmp_path, embedded_dir):
    from aift import LoRAConfig, PreferenceConfig, PreferenceTrainer, TrainingConfig
    from aift.data.preference import load_preference_rows
    from aift.data.prepare import prepare_preference
    from aift.training.objectives.pairs import PairObjective

    src = tmp_path / "larger.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in _pairs(64, seed=1)), encoding="utf-8")
    data = prepare_preference(
        str(embedded_dir), source_path=src, output_dir=tmp_path / "data", val_ratio=0.5, max_length=64
    )
    held_out, _ = load_preference_rows(str(data), "held-out", "test", "dpo", 64)
    config = TrainingConfig(
        model_name=str(embedded_dir),
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-3,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=16,
        warmup_steps=0,
        eval_steps=0,
        logging_steps=4,
        save_steps=0,
        report_to=["none"],
    )  # fmt: skip  (defaults otherwise: bf16 autocast, gradient checkpointing)
    trainer = PreferenceTrainer(
        str(embedded_dir), PreferenceConfig(method="dpo"), LoRAConfig(r=8, lora_alpha=16), config,
        train_dataset=str(data), eval_dataset=[],
    )  # fmt: skip
    model = trainer.train().eval()
    # Measured on two plain rows per pair (the model's own forward), whatever layout training used.
    objective = PairObjective(
        PreferenceConfig(share_prompt=False), pad_token_id=trainer.model.load_tokenizer().pad_token_id
    )
    after = _ranked_right(model, objective, held_out)
    with model.disable_adapter():
        before = _ranked_right(model, objective, held_out)
    assert before < 0.7, f"the base model already ranks {before:.0%} right: the task proves nothing"
    assert after >= 0.85 and after - before >= 0.2, f"held-out pairs ranked right: base {before:.0%}, DPO {after:.0%}"
