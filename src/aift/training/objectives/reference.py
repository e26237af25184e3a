"""What the reference-based families (:mod:`.pairs`, :mod:`.kto`) share: data plan, eval order, reference.

Micro-batches are padded rows (no packing), length-grouped in an order fixed by (seed, epoch). The reference
log-probs are either in the batch (``ref_logps`` ..., precomputed before training, as a full fine-tune must)
or computed on the fly with the LoRA adapter disabled.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from aift.data.packing import length_grouped_batches
from aift.training.batching import DatasetError
from aift.training.objectives import Autocast, to_device
from aift.training.objectives.logps import forward_logps, reference_mode


class ReferenceObjective:
    """The shared half of a preference objective; a family says how rows collate and store their reference.

    Subclasses set ``uses_reference`` (DPO, KTO: True), ``row_key`` (the prepared column the data must have)
    and ``kind`` (what the data is called in errors), and define ``lengths``, ``collate``, ``loss_sum`` and
    ``_store_reference``.
    """

    uses_reference: bool
    row_key: str
    kind: str

    def __init__(self, config, pad_token_id: int, precompute: bool = False, loss_chunk_size: int = 0) -> None:
        self.config = config
        self.chunk_size = loss_chunk_size
        self.name = config.method
        self.pad_token_id = pad_token_id
        self.needs_reference = self.uses_reference
        self.precompute = precompute and self.needs_reference

    # ---------------------------------------------------------------- data

    def lengths(self, rows: list[dict]) -> list[int]:
        raise NotImplementedError

    def collate(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    def epoch(self, rows: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """Micro-batches of one epoch: length-grouped, in an order fixed by (seed, epoch)."""
        return length_grouped_batches(self.lengths(rows), batch_size, seed=seed + epoch)

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def check(self, examples) -> None:
        if not examples.rows:
            raise DatasetError(f"the {examples.name} dataset is empty")
        if self.row_key not in examples.rows[0]:
            raise DatasetError(
                f"method {self.name} trains on {self.kind}: prepare the data with `aift prepare --task preference`"
            )

    def planner(self, examples, config, pad_token_id: int, mask: str) -> PreferencePlanner:
        return PreferencePlanner(self, examples.rows, config.batch_size, config.seed)

    def eval_batches(self, examples, batch_size: int, pad_token_id: int, rank: int, world: int):
        """This process's share of the eval split, in a fixed order."""
        rows = examples.rows
        for k, start in enumerate(range(0, len(rows), batch_size)):
            if k % world == rank:
                yield self.collate(rows[start : start + batch_size])

    # ---------------------------------------------------------------- reference

    def reference_logps(self, model, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reference log-probs of the batch's sequences, of its KL sequences or None)."""
        if "ref_logps" in batch:
            return batch["ref_logps"], batch.get("ref_kl_logps")
        with reference_mode(model) as reference:
            logps, _ = forward_logps(reference, batch, autocast, self.chunk_size)
            kl = forward_logps(reference, batch["kl"], autocast, self.chunk_size)[0] if "kl" in batch else None
        return logps, kl

    @torch.no_grad()
    def precompute_reference(self, model, rows: list[dict], batch_size: int, autocast: Autocast, device) -> None:
        """Stores the reference log-probs in ``rows`` (the model as it is now, before any update)."""
        inner = getattr(model, "module", model)
        was_training = inner.training
        inner.eval()
        context = inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()
        try:
            with context:
                for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs"):
                    chunk = rows[start : start + batch_size]
                    batch = to_device(self.collate(chunk), device)
                    self._store_reference(inner, chunk, batch, autocast)
        finally:
            inner.train(was_training)

    def _store_reference(self, model, rows: list[dict], batch: dict, autocast: Autocast) -> None:
        raise NotImplementedError


@dataclass
class PreferencePlanner:
    """BatchPlanner's interface for pairs: padded micro-batches (no packing), a plan fixed by (seed, epoch)."""

    objective: ReferenceObjective
    rows: list[dict]
    batch_size: int
    seed: int
    efficiency: float = 1.0

    def epoch(self, epoch: int) -> list[list[int]]:
        return self.objective.epoch(self.rows, self.batch_size, self.seed, epoch)

    def num_micro_batches(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def collate(self, micro_batch: list[int]) -> dict:
        return self.objective.collate([self.rows[i] for i in micro_batch])
