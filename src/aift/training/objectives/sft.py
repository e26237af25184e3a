"""Supervised fine-tuning: the sum over trained tokens of the per-token cross-entropy (fp32, from the logits)."""

from __future__ import annotations

import torch

from aift.training.batching import BatchPlanner, check_trainable, eval_batches
from aift.training.loss import causal_lm_loss_sum, shifted_cross_entropy_sum
from aift.training.objectives import Autocast, Metrics


class SFTObjective:
    """Sum over trained tokens of the per-token cross-entropy; the loop divides by the trained tokens."""

    name = "sft"
    config = None  # SFT has no options of its own: TrainingConfig holds them
    needs_reference = False

    def __init__(self, loss_chunk_size: int = 0) -> None:
        self.loss_chunk_size = loss_chunk_size

    def count(self, batch: dict) -> int:
        return int(batch["num_trained_tokens"])

    def check(self, examples) -> None:
        check_trainable(examples)

    def planner(self, examples, config, pad_token_id: int, mask: str) -> BatchPlanner:
        return BatchPlanner(
            examples, config.batch_size, config.max_length, config.packing, pad_token_id, config.seed, mask=mask
        )

    def eval_batches(self, examples, batch_size: int, pad_token_id: int, rank: int, world: int):
        return eval_batches(examples, batch_size, pad_token_id, rank, world)

    def loss_sum(self, model, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, Metrics]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with autocast():
            if self.loss_chunk_size:  # fused linear cross-entropy: never the whole batch's logits
                return causal_lm_loss_sum(model, {**inputs, "labels": batch["labels"]}, self.loss_chunk_size), {}
            logits = model(**inputs, use_cache=False).logits
        return shifted_cross_entropy_sum(logits, batch["labels"]), {}


def build(method_config: None, *, loss_chunk_size: int = 0, **_: object) -> SFTObjective:
    """The registry's builder (:mod:`aift.training.methods`): SFT reads only the loss chunk size."""
    return SFTObjective(loss_chunk_size)
