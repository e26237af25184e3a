"""The loop's rollout hook with a toy objective: when it is called, in which mode, what count sees, and that an
objective's state goes into checkpoints and comes back on resume."""

from __future__ import annotations

import pytest
import torch

from aift.training.batching import Examples
from aift.training.checkpoint import CheckpointError, load_objective_state
from aift.training.loop import run_training
from aift.training.objectives.sft import SFTObjective
from aift.training.run_files import RunInfo

TEXTS = [f"質問: {i} たす {i} は?\n回答: {2 * i} です。" for i in range(8)]


class ToyRollout(SFTObjective):
    """SFT whose rollout drops the trained tokens of the second half of each row, and records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.counted: list[bool] = []
        self.loaded: dict | None = None

    def rollout(self, batches, ctx):
        self.calls.append(
            {
                "step": ctx.step,
                "epoch": ctx.epoch,
                "indices": ctx.micro_batches,
                "training": ctx.model.training,
                "grad": torch.is_grad_enabled(),
                "wrapped": hasattr(ctx.model, "module"),
                "eval": ctx.is_eval,
                "gathered": ctx.all_gather(torch.tensor([1.0, 2.0])).tolist(),
            }
        )
        out = []
        for batch in batches:
            labels = batch["labels"].clone()
            labels[:, labels.shape[1] // 2 :] = -100
            out.append({**batch, "labels": labels, "num_trained_tokens": int((labels[:, 1:] != -100).sum())})
            out[-1]["rolled"] = True
        return out

    def count(self, batch):
        self.counted.append(batch.get("rolled", False))
        return super().count(batch)

    def state_dict(self):
        return {"calls": len([c for c in self.calls if not c["eval"]]), "marker": torch.tensor([7.0])}

    def load_state_dict(self, state):
        self.loaded = state


@pytest.fixture
def toy_run(fp32_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    examples = Examples(rows=[{"input_ids": x, "labels": x} for x in ids], name="training")
    evaluation = Examples(rows=examples.rows[:2], name="evaluation")

    def run(objective, **overrides):
        config = fp32_config(batch_size=2, gradient_accumulation_steps=2, packing=False, **overrides)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        info = RunInfo(method="full", model_name=str(tiny_model_dir))
        return run_training(model, tokenizer, config, examples, evaluation, info, objective=objective)

    return run


def test_rollout_runs_once_per_step_in_eval_mode_and_its_state_is_restored_on_resume(toy_run, read_metrics):
    toy = ToyRollout()
    result = toy_run(toy, max_steps=3, save_steps=2, eval_steps=0)

    train_calls = [c for c in toy.calls if not c["eval"]]
    # 8 rows / batch 2 = 4 micro-batches an epoch, 2 a step: step 2 starts epoch 1
    assert [(c["step"], c["epoch"], c["indices"]) for c in train_calls] == [
        (0, 0, (0, 1)),
        (1, 0, (2, 3)),
        (2, 1, (0, 1)),
    ]
    assert all(not c["training"] and not c["grad"] and not c["wrapped"] for c in toy.calls)
    assert all(c["gathered"] == [1.0, 2.0] for c in toy.calls)  # one process: all_gather is the tensor
    assert result.model.training  # train mode came back after each rollout
    assert toy.counted and all(toy.counted)  # every batch counted was the rollout's
    eval_calls = [c for c in toy.calls if c["eval"]]
    assert [c["indices"] for c in eval_calls] == [(0,), (0,)]  # before training and at the end
    records = read_metrics(result.output_dir)
    assert all(r["rollout_s"] > 0 and r["train_s"] > 0 for r in records)

    checkpoint = result.output_dir / "checkpoints" / "checkpoint-2"
    saved = load_objective_state(checkpoint, rank=0, world=1)
    assert saved["calls"] == 2 and torch.equal(saved["marker"], torch.tensor([7.0]))
    with pytest.raises(CheckpointError, match="1 process"):
        load_objective_state(checkpoint, rank=0, world=2)
    resumed = ToyRollout()
    toy_run(resumed, max_steps=3, resume_from_checkpoint=str(checkpoint))
    assert resumed.loaded is not None and resumed.loaded["calls"] == 2
    assert [c["indices"] for c in resumed.calls if not c["eval"]] == [(0, 1)]  # only step 3 (epoch 1) is left
