"""Answer log-probs from a model: what the preference families (and GRPO's old log-probs) build their losses on."""

from __future__ import annotations

import contextlib

import torch

from aift.data.packing import IGNORE_INDEX, trained_positions
from aift.errors import AiftError
from aift.training.loss import fused_linear_cross_entropy, shifted_cross_entropy, split_causal_lm
from aift.training.objectives import Autocast
from aift.training.prompt_sharing import gather_sequences


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the trained tokens of each row (fp32), and how many there are.

    ``labels[:, i]`` is the target of position ``i`` (the prepared-data contract), predicted by position i-1.
    """
    return -shifted_cross_entropy(logits, labels).sum(-1), trained_positions(labels).sum(-1)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_sequences(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict:
    """Right-padded input_ids / attention_mask / labels for a list of sequences."""
    return {
        "input_ids": _pad(input_ids, pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in input_ids], 0),
        "labels": _pad(labels, IGNORE_INDEX),
    }


def forward_logps(model, batch: dict, autocast: Autocast, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of each row and the answer lengths.

    With ``chunk_size`` the fused linear cross-entropy of :mod:`aift.training.loss` gives each row's sum from
    the final hidden states, a chunk of answer positions at a time: no full-vocabulary logits, and none at all
    for prompt and padding positions.
    """
    if "gather_index" in batch:
        return _shared_prompt_logps(model, batch, autocast, chunk_size)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["labels"]
    if not chunk_size:
        with autocast():
            logits = model(**inputs).logits
        return sequence_logps(logits, labels)
    _, head = split_causal_lm(model)
    with autocast():
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        return _fused_row_logps(hidden, head.weight, labels, chunk_size)


def _fused_row_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
    """Each row's summed answer log-prob from its final hidden states (fused, chunked), and the answer lengths."""
    sums = [-fused_linear_cross_entropy(hidden[i : i + 1], weight, labels[i : i + 1], chunk_size)
            for i in range(hidden.shape[0])]  # fmt: skip
    return torch.stack(sums), trained_positions(labels).sum(-1)


def _shared_prompt_logps(model, batch: dict, autocast: Autocast, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`forward_logps`, for pairs collated by :func:`aift.training.prompt_sharing.collate_shared`."""
    _, head = split_causal_lm(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    labels = batch["labels"]
    with autocast():
        hidden = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        sequences = gather_sequences(hidden, batch["gather_index"])
        if not chunk_size:
            return sequence_logps(head(sequences), labels)
        return _fused_row_logps(sequences, head.weight, labels, chunk_size)


@contextlib.contextmanager
def reference_mode(model):
    """The model as its own reference: LoRA adapters disabled, eval mode (no dropout), no gradients.

    A full fine-tune has no reference inside the model: its reference log-probs are precomputed before
    training (``ReferenceObjective.precompute_reference``).
    """
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if not hasattr(inner, "disable_adapter"):
        raise AiftError("the reference of a full fine-tune must be precomputed (precompute_ref_log_probs)")
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), inner.disable_adapter():
            yield inner
    finally:
        inner.train(was_training)
