"""KTO on labelled, unpaired examples: each answer is desirable (label true) or not, against a reference point.

Per example (TRL 1.16's ``KTOTrainer``): ``w_d·(1 − σ(β·(r − z)))`` for desirable, ``w_u·(1 − σ(β·(z − r)))``
for undesirable examples, r the log-ratio to the reference and z the (detached, clamped at 0) KL estimate from
mismatched prompt/answer pairs of the same micro-batch. Its options are PreferenceConfig's (`preference:`).
"""

from __future__ import annotations

import torch

from aift.data.packing import IGNORE_INDEX, answer_start
from aift.training.objectives import Autocast, Metrics
from aift.training.objectives.logps import collate_sequences, forward_logps
from aift.training.objectives.pairs import PreferenceConfig
from aift.training.objectives.reference import ReferenceObjective


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO per example (``[B]`` losses and rewards); ``kl`` is the detached reference point z (a scalar)."""
    ratio = logps - ref_logps
    kl = kl.detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach()


class KTOObjective(ReferenceObjective):
    """KTO: the loss summed over examples (count = examples, logged as pairs as the other families)."""

    uses_reference = True
    row_key = "input_ids"
    kind = "labelled examples (or preference pairs)"

    def lengths(self, rows: list[dict]) -> list[int]:
        return [len(r["input_ids"]) for r in rows]

    def collate(self, rows: list[dict]) -> dict:
        batch = collate_sequences([r["input_ids"] for r in rows], [r["labels"] for r in rows], self.pad_token_id)
        batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
        batch["kl"] = collate_sequences(*_mismatched(rows), self.pad_token_id)
        if all("ref_logps" in r for r in rows):
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
            batch["ref_kl_logps"] = torch.tensor([r["ref_kl_logps"] for r in rows], dtype=torch.float32)
        batch["num_pairs"] = len(rows)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def _store_reference(self, model, rows: list[dict], batch: dict, autocast: Autocast) -> None:
        logps = forward_logps(model, batch, autocast, self.chunk_size)[0].tolist()
        kl = forward_logps(model, batch["kl"], autocast, self.chunk_size)[0].tolist()
        for i, row in enumerate(rows):
            row["ref_logps"], row["ref_kl_logps"] = logps[i], kl[i]

    def loss_sum(self, model, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, Metrics]:
        """Sum of the per-example losses, and sums of the logged metrics."""
        cfg = self.config
        logps, _ = forward_logps(model, batch, autocast, self.chunk_size)
        with torch.no_grad():
            kl_logps, _ = forward_logps(model, batch["kl"], autocast, self.chunk_size)
        ref, ref_kl = self.reference_logps(model, batch, autocast)
        kl = (kl_logps - ref_kl.to(kl_logps)).mean()
        losses, rewards = kto_loss(
            logps,
            ref.to(logps),
            batch["desirable"],
            kl,
            cfg.resolved_beta,
            cfg.desirable_weight,
            cfg.undesirable_weight,
        )
        good = batch["desirable"].float()
        metrics = {
            "rewards/chosen": (rewards * good).sum(),
            "rewards/rejected": (rewards * (1 - good)).sum(),
            "logps/chosen": (logps.detach() * good).sum(),
            "logps/rejected": (logps.detach() * (1 - good)).sum(),
            "kl": kl.detach().clamp(min=0) * len(good),
        }
        return losses.sum(), metrics


def _mismatched(rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """KTO's KL sequences: each prompt with the answer of the previous example of the batch (TRL's cycle)."""
    ids, labels = [], []
    for i, row in enumerate(rows):
        other = rows[i - 1]
        p, q = answer_start(row["labels"]), answer_start(other["labels"])
        ids.append(row["input_ids"][:p] + other["input_ids"][q:])
        labels.append([IGNORE_INDEX] * p + other["labels"][q:])
    return ids, labels


def build(config: PreferenceConfig, *, pad_token_id: int, is_peft: bool, loss_chunk_size: int = 0,
          **_: object) -> KTOObjective:  # fmt: skip
    """The registry's builder: a full fine-tune (no adapter to disable) always precomputes its reference."""
    precompute = config.precompute_ref_log_probs or not is_peft
    return KTOObjective(config, pad_token_id, precompute=precompute, loss_chunk_size=loss_chunk_size)
