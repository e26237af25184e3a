"""Training objectives: what the one loop minimises for a micro-batch.

An objective turns a collated micro-batch into ``(loss_sum, metric_sums)`` and says by what the loop divides
that sum (``count``): the SFT objective sums per-token cross-entropy over trained tokens (count = trained
tokens), the preference objectives sum per-pair (or per-example, KTO) losses (count = pairs). Summing over
micro-batches and processes, then dividing by the total count, makes gradient accumulation and data
parallelism equal one big batch, whatever the objective.

The preference losses are pure functions of sequence log-probabilities (policy and reference, chosen and
rejected), answer lengths and the config; each follows TRL 1.16's formula (tests compare them with
``DPOTrainer``, ``CPOTrainer`` (SimPO), ``ORPOTrainer`` and ``KTOTrainer``):

- DPO ``sigmoid``: ``-log σ(β·Δ)``, Δ = (log π/π_ref)(chosen) − (log π/π_ref)(rejected); ``robust`` adds
  label smoothing ε (the probability that a label is flipped); ``hinge``; ``ipo``: ``(Δ/len − 1/(2β))²``
  with each log-ratio averaged over its answer's tokens, as TRL does.
- SimPO: length-normalised log-probs, no reference: ``-log σ(β·(avg_c − avg_r) − γ)``.
- ORPO: NLL of the chosen answer plus ``-β·log σ(log odds_c − log odds_r)``, no reference.
- KTO: ``w_d·(1 − σ(β·(r − z)))`` for desirable, ``w_u·(1 − σ(β·(z − r)))`` for undesirable examples,
  z the (detached, clamped at 0) KL estimate from mismatched prompt/answer pairs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from aift.config import DPO_LOSS_TYPES
from aift.data.packing import IGNORE_INDEX, length_grouped_batches, trained_positions
from aift.errors import AiftError

Autocast = Callable[[], contextlib.AbstractContextManager]


# ---------------------------------------------------------------------- pure losses (per pair / example)


@dataclass
class PairLosses:
    """Per-pair losses and the implicit rewards logged beside them."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PairLosses:
    """DPO and its variants from summed answer log-probs (``[B]`` each); lengths are needed by ``ipo``."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs the answer lengths")
        per_token = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(DPO_LOSS_TYPES)}")
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """SimPO from per-token average answer log-probs (CPOTrainer's loss_type='simpo')."""
    logits = chosen_avg_logps - rejected_avg_logps - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return PairLosses(losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching formula at -ln 2 to avoid cancellation."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 0.1) -> PairLosses:
    """ORPO from per-token average answer log-probs: chosen NLL plus β times the odds-ratio term."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


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


# ---------------------------------------------------------------------- log-probs from a model


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the trained tokens of each row (fp32), and how many there are.

    ``labels[:, i]`` is the target of position ``i`` (the prepared-data contract), predicted by position i-1.
    """
    from aift.training.loss import shifted_cross_entropy

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


# ---------------------------------------------------------------------- objectives


class SFTObjective:
    """Sum over trained tokens of the per-token cross-entropy, computed in fp32 from the logits."""

    name = "sft"
    needs_reference = False

    def __init__(self, loss_chunk_size: int = 0) -> None:
        self.loss_chunk_size = loss_chunk_size

    def count(self, batch: dict) -> int:
        return int(batch["num_trained_tokens"])

    def check(self, examples) -> None:
        from aift.training.batching import check_trainable

        check_trainable(examples)

    def planner(self, examples, config, pad_token_id: int, mask: str):
        from aift.training.batching import BatchPlanner

        return BatchPlanner(
            examples, config.batch_size, config.max_length, config.packing, pad_token_id, config.seed, mask=mask
        )

    def eval_batches(self, examples, batch_size: int, pad_token_id: int, rank: int, world: int):
        from aift.training.batching import eval_batches

        return eval_batches(examples, batch_size, pad_token_id, rank, world)

    def loss_sum(self, model, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from aift.training.loss import causal_lm_loss_sum, shifted_cross_entropy_sum

        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with autocast():
            if self.loss_chunk_size:  # fused linear cross-entropy: never the whole batch's logits
                return causal_lm_loss_sum(model, {**inputs, "labels": batch["labels"]}, self.loss_chunk_size), {}
            logits = model(**inputs, use_cache=False).logits
        return shifted_cross_entropy_sum(logits, batch["labels"]), {}


def _forward_logps(model, batch: dict, autocast: Autocast, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
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
    from aift.training.loss import split_causal_lm

    _, head = split_causal_lm(model)
    with autocast():
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        return _fused_row_logps(hidden, head.weight, labels, chunk_size)


def _fused_row_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
    """Each row's summed answer log-prob from its final hidden states (fused, chunked), and the answer lengths."""
    from aift.training.loss import fused_linear_cross_entropy

    sums = [-fused_linear_cross_entropy(hidden[i : i + 1], weight, labels[i : i + 1], chunk_size)
            for i in range(hidden.shape[0])]  # fmt: skip
    return torch.stack(sums), trained_positions(labels).sum(-1)


def _shared_prompt_logps(model, batch: dict, autocast: Autocast, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_forward_logps`, for pairs collated by :func:`aift.training.prompt_sharing.collate_shared`."""
    from aift.training.loss import split_causal_lm
    from aift.training.prompt_sharing import gather_sequences

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
    training (``PreferenceObjective.precompute``).
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


class PreferenceObjective:
    """DPO / ORPO / SimPO on pairs (chosen and rejected in one concatenated forward), KTO on labelled examples.

    Micro-batches come from :meth:`collate` (``[chosen..., rejected...]`` rows for pairs). The reference
    log-probs are either in the batch (``ref_chosen_logps`` ..., precomputed) or computed on the fly with
    the LoRA adapter disabled.
    """

    needs_reference: bool

    def __init__(self, config, pad_token_id: int, precompute: bool = False, loss_chunk_size: int = 0) -> None:
        self.config = config
        self.chunk_size = loss_chunk_size
        self.name = config.method
        self.pad_token_id = pad_token_id
        self.needs_reference = config.method in ("dpo", "kto")
        self.precompute = precompute and self.needs_reference
        self.paired = config.method != "kto"
        self.share_prompt = self.paired and config.share_prompt

    # ---------------------------------------------------------------- data

    def lengths(self, rows: list[dict]) -> list[int]:
        if self.paired:
            return [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows]
        return [len(r["input_ids"]) for r in rows]

    def epoch(self, rows: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """Micro-batches of one epoch: length-grouped, in an order fixed by (seed, epoch)."""
        return length_grouped_batches(self.lengths(rows), batch_size, seed=seed + epoch)

    def collate(self, rows: list[dict]) -> dict:
        if self.paired:
            ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
            if self.share_prompt:
                from aift.training.prompt_sharing import collate_shared

                batch = collate_shared(rows, self.pad_token_id)
            else:
                labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
                batch = collate_sequences(ids, labels, self.pad_token_id)
            if all("ref_chosen_logps" in r for r in rows):
                batch["ref_logps"] = torch.tensor(
                    [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows],
                    dtype=torch.float32,
                )
        else:
            batch = collate_sequences([r["input_ids"] for r in rows], [r["labels"] for r in rows], self.pad_token_id)
            batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
            batch["kl"] = collate_sequences(*_mismatched(rows), self.pad_token_id)
            if all("ref_logps" in r for r in rows):
                batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
                batch["ref_kl_logps"] = torch.tensor([r["ref_kl_logps"] for r in rows], dtype=torch.float32)
        batch["num_pairs"] = len(rows)
        # The pairs' own tokens (both sequences, prompt counted twice), whether or not the prompt is shared.
        batch["num_tokens"] = sum(map(len, ids)) if self.paired else int(batch["attention_mask"].sum())
        return batch

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def check(self, examples) -> None:
        from aift.training.batching import DatasetError

        if not examples.rows:
            raise DatasetError(f"the {examples.name} dataset is empty")
        key = "chosen_input_ids" if self.paired else "input_ids"
        if key not in examples.rows[0]:
            kind = "preference pairs" if self.paired else "labelled examples (or preference pairs)"
            raise DatasetError(
                f"method {self.name} trains on {kind}: prepare the data with `aift prepare --task preference`"
            )

    def planner(self, examples, config, pad_token_id: int, mask: str) -> PreferencePlanner:
        if mask != "4d":  # flash-attention and aift's segment attention take no 4-D mask: a pair is two rows
            self.share_prompt = False
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
            logps, _ = _forward_logps(reference, batch, autocast, self.chunk_size)
            kl = _forward_logps(reference, batch["kl"], autocast, self.chunk_size)[0] if "kl" in batch else None
        return logps, kl

    @torch.no_grad()
    def precompute_reference(self, model, rows: list[dict], batch_size: int, autocast: Autocast, device) -> None:
        """Stores the reference log-probs in ``rows`` (the model as it is now, before any update)."""
        from tqdm.auto import tqdm

        inner = getattr(model, "module", model)
        was_training = inner.training
        inner.eval()
        context = inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()
        try:
            with context:
                for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs"):
                    chunk = rows[start : start + batch_size]
                    batch = _to_device(self.collate(chunk), device)
                    logps = _forward_logps(inner, batch, autocast, self.chunk_size)[0].tolist()
                    if self.paired:
                        for i, row in enumerate(chunk):
                            row["ref_chosen_logps"], row["ref_rejected_logps"] = logps[i], logps[i + len(chunk)]
                    else:
                        kl = _forward_logps(inner, batch["kl"], autocast, self.chunk_size)[0].tolist()
                        for i, row in enumerate(chunk):
                            row["ref_logps"], row["ref_kl_logps"] = logps[i], kl[i]
        finally:
            inner.train(was_training)

    # ---------------------------------------------------------------- loss

    def loss_sum(self, model, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the per-pair (KTO: per-example) losses, and sums of the logged metrics."""
        logps, lengths = _forward_logps(model, batch, autocast, self.chunk_size)
        if not self.paired:
            return self._kto(model, batch, logps, autocast)
        n = logps.shape[0] // 2
        method, cfg = self.config.method, self.config
        if method == "dpo":
            ref, _ = self.reference_logps(model, batch, autocast)
            out = dpo_loss(
                logps[:n],
                logps[n:],
                ref[:n].to(logps),
                ref[n:].to(logps),
                beta=cfg.resolved_beta,
                loss_type=cfg.loss_type,
                label_smoothing=cfg.label_smoothing,
                chosen_lengths=lengths[:n],
                rejected_lengths=lengths[n:],
            )
        else:
            avg = logps / lengths.clamp(min=1)
            if method == "simpo":
                out = simpo_loss(avg[:n], avg[n:], cfg.resolved_beta, cfg.simpo_gamma, cfg.label_smoothing)
            else:
                out = orpo_loss(avg[:n], avg[n:], cfg.resolved_beta)
        losses = out.losses
        if cfg.rpo_alpha and method != "orpo":  # NLL of the chosen answer, per token, as TRL's rpo_alpha / cpo_alpha
            losses = losses + cfg.rpo_alpha * (-logps[:n] / lengths[:n].clamp(min=1))
        return losses.sum(), _pair_metrics(out, logps[:n].detach(), logps[n:].detach())

    def _kto(self, model, batch: dict, logps: torch.Tensor, autocast: Autocast):
        cfg = self.config
        with torch.no_grad():
            kl_logps, _ = _forward_logps(model, batch["kl"], autocast, self.chunk_size)
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


@dataclass
class PreferencePlanner:
    """BatchPlanner's interface for pairs: padded micro-batches (no packing), a plan fixed by (seed, epoch)."""

    objective: PreferenceObjective
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


def _pair_metrics(out: PairLosses, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict:
    """Sums over the pairs of the micro-batch; the loop divides them by the pair count of the step."""
    return {
        "rewards/chosen": out.chosen_rewards.sum(),
        "rewards/rejected": out.rejected_rewards.sum(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum(),
        "logps/chosen": chosen_logps.sum(),
        "logps/rejected": rejected_logps.sum(),
    }


def _mismatched(rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """KTO's KL sequences: each prompt with the answer of the previous example of the batch (TRL's cycle)."""
    ids, labels = [], []
    for i, row in enumerate(rows):
        other = rows[i - 1]
        p, q = answer_start(row["labels"]), answer_start(other["labels"])
        ids.append(row["input_ids"][:p] + other["input_ids"][q:])
        labels.append([IGNORE_INDEX] * p + other["labels"][q:])
    return ids, labels


def answer_start(labels: list[int]) -> int:
    """Index of the first trained token (the length when none is trained)."""
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def _to_device(batch: dict, device) -> dict:
    return {
        k: (_to_device(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v)
        for k, v in batch.items()
    }


def to_device(batch: dict, device) -> dict:
    """A collated batch (tensors, nested KL batch) on ``device``."""
    return _to_device(batch, device)


def make_objective(preference, pad_token_id: int, is_peft: bool, loss_chunk_size: int = 0) -> Any:
    """The SFT objective without a preference config; else the preference objective of its method."""
    if preference is None:
        return SFTObjective(loss_chunk_size)
    precompute = preference.precompute_ref_log_probs or not is_peft
    return PreferenceObjective(preference, pad_token_id, precompute=precompute, loss_chunk_size=loss_chunk_size)
