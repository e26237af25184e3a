"""DPO, ORPO and SimPO on preference pairs, and PreferenceConfig, the ``preference:`` options (KTO's too).

The losses are pure functions of sequence log-probabilities (policy and reference, chosen and rejected),
answer lengths and the config; each follows TRL 1.16's formula (tests compare them with ``DPOTrainer``,
``CPOTrainer`` (SimPO) and ``ORPOTrainer``):

- DPO ``sigmoid``: ``-log σ(β·Δ)``, Δ = (log π/π_ref)(chosen) − (log π/π_ref)(rejected); ``robust`` adds
  label smoothing ε (the probability that a label is flipped); ``hinge``; ``ipo``: ``(Δ/len − 1/(2β))²``
  with each log-ratio averaged over its answer's tokens, as TRL does.
- SimPO: length-normalised log-probs, no reference: ``-log σ(β·(avg_c − avg_r) − γ)``.
- ORPO: NLL of the chosen answer plus ``-β·log σ(log odds_c − log odds_r)``, no reference.

A pair is two rows of one micro-batch, ``[chosen..., rejected...]``, in one concatenated forward (or one row
with the prompt shared, :mod:`aift.training.prompt_sharing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aift.config import ConfigError, check_non_negative, option
from aift.training.objectives import Autocast, Metrics
from aift.training.objectives.logps import collate_sequences, forward_logps
from aift.training.objectives.reference import PreferencePlanner, ReferenceObjective
from aift.training.prompt_sharing import collate_shared

# The methods this config serves: the pair methods here and KTO (:mod:`.kto`), all under `preference:`.
PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
# TRL's defaults: DPOConfig / ORPOConfig / KTOConfig beta 0.1; SimPO's paper and TRL's docs beta 2.0.
_DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


@dataclass
class PreferenceConfig:
    """Preference tuning after SFT (`aift train --method dpo|orpo|simpo|kto`); defaults are TRL 1.16's."""

    method: str = option("dpo", "dpo, orpo, simpo (no reference model) or kto (unpaired examples with a label).")
    beta: float | None = option(
        None,
        "Strength of the preference term: DPO/KTO the deviation from the reference (0.1), IPO its regulariser "
        "tau, ORPO the odds-ratio weight lambda (0.1), SimPO the reward scale (2.0). None: that default.",
    )
    loss_type: str = option(
        "sigmoid",
        "DPO loss: sigmoid (DPO), robust (DPO with label_smoothing), hinge (SLiC) or ipo (IPO, length-normalised).",
    )
    label_smoothing: float = option(
        0.0, "Probability that a preference label is flipped, in [0, 0.5): used by loss_type=robust and SimPO."
    )
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma.")
    rpo_alpha: float | None = option(
        None, "DPO/SimPO: add this weight times the chosen answer's per-token NLL (RPO / CPO); None adds none."
    )
    desirable_weight: float = option(1.0, "KTO weight of the desirable (label true) examples.")
    undesirable_weight: float = option(1.0, "KTO weight of the undesirable (label false) examples.")
    precompute_ref_log_probs: bool = option(
        False,
        "Compute the reference log-probs once, before training, instead of a reference forward per step "
        "(always so for full fine-tuning; LoRA otherwise uses the base with the adapter disabled).",
    )
    disable_dropout: bool = option(
        True, "Turn dropout off in the model (TRL's default: rewards need deterministic logps)."
    )
    share_prompt: bool = option(
        True,
        "Run a pair's shared prompt once: one row prompt+chosen+rejected with a mask that hides the chosen answer "
        "from the rejected one (same log-probs, fewer tokens; SDPA/eager attention only, else off).",
    )

    def __post_init__(self) -> None:
        if self.method not in PREFERENCE_METHODS:
            raise ConfigError(f"method must be one of {', '.join(PREFERENCE_METHODS)}; got {self.method!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {self.loss_type!r}")
        if self.loss_type != "sigmoid" and self.method != "dpo":
            raise ConfigError(f"loss_type={self.loss_type!r} applies to method dpo, not {self.method}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and not (self.loss_type == "robust" or self.method == "simpo"):
            raise ConfigError("label_smoothing is used by loss_type=robust (DPO) and by SimPO only (as in TRL)")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.rpo_alpha is not None and self.method in ("orpo", "kto"):
            raise ConfigError(f"rpo_alpha applies to dpo and simpo, not {self.method}")
        check_non_negative(self, "desirable_weight", "undesirable_weight")

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else _DEFAULT_BETA[self.method]


# ---------------------------------------------------------------------- pure losses (per pair)


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


# ---------------------------------------------------------------------- the objective


class PairObjective(ReferenceObjective):
    """DPO / ORPO / SimPO: chosen and rejected answers of each pair in one forward; count = pairs."""

    row_key = "chosen_input_ids"
    kind = "preference pairs"

    def __init__(self, config: PreferenceConfig, pad_token_id: int, precompute: bool = False,
                 loss_chunk_size: int = 0) -> None:  # fmt: skip
        self.uses_reference = config.method == "dpo"  # ORPO and SimPO need no reference model
        super().__init__(config, pad_token_id, precompute, loss_chunk_size)
        self.share_prompt = config.share_prompt
        self._loss = {"dpo": self._dpo, "simpo": self._simpo, "orpo": self._orpo}[config.method]

    def lengths(self, rows: list[dict]) -> list[int]:
        return [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows]

    def planner(self, examples, config, pad_token_id: int, mask: str) -> PreferencePlanner:
        if mask != "4d":  # flash-attention and aift's segment attention take no 4-D mask: a pair is two rows
            self.share_prompt = False
        return super().planner(examples, config, pad_token_id, mask)

    def collate(self, rows: list[dict]) -> dict:
        ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        if self.share_prompt:
            batch = collate_shared(rows, self.pad_token_id)
        else:
            labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
            batch = collate_sequences(ids, labels, self.pad_token_id)
        if all("ref_chosen_logps" in r for r in rows):
            batch["ref_logps"] = torch.tensor(
                [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32
            )
        batch["num_pairs"] = len(rows)
        # The pairs' own tokens (both sequences, prompt counted twice), whether or not the prompt is shared.
        batch["num_tokens"] = sum(map(len, ids))
        return batch

    def _store_reference(self, model, rows: list[dict], batch: dict, autocast: Autocast) -> None:
        logps = forward_logps(model, batch, autocast, self.chunk_size)[0].tolist()
        for i, row in enumerate(rows):
            row["ref_chosen_logps"], row["ref_rejected_logps"] = logps[i], logps[i + len(rows)]

    def loss_sum(self, model, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, Metrics]:
        """Sum of the per-pair losses, and sums of the logged metrics."""
        logps, lengths = forward_logps(model, batch, autocast, self.chunk_size)
        n = logps.shape[0] // 2
        out = self._loss(model, batch, autocast, logps, lengths)
        losses, cfg = out.losses, self.config
        if cfg.rpo_alpha:  # NLL of the chosen answer, per token, as TRL's rpo_alpha / cpo_alpha (not ORPO's)
            losses = losses + cfg.rpo_alpha * (-logps[:n] / lengths[:n].clamp(min=1))
        return losses.sum(), _pair_metrics(out, logps[:n].detach(), logps[n:].detach())

    def _dpo(self, model, batch: dict, autocast: Autocast, logps: torch.Tensor, lengths: torch.Tensor) -> PairLosses:
        n, cfg = logps.shape[0] // 2, self.config
        ref, _ = self.reference_logps(model, batch, autocast)
        return dpo_loss(
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

    def _simpo(self, model, batch: dict, autocast: Autocast, logps: torch.Tensor, lengths: torch.Tensor):
        avg, n, cfg = logps / lengths.clamp(min=1), logps.shape[0] // 2, self.config
        return simpo_loss(avg[:n], avg[n:], cfg.resolved_beta, cfg.simpo_gamma, cfg.label_smoothing)

    def _orpo(self, model, batch: dict, autocast: Autocast, logps: torch.Tensor, lengths: torch.Tensor):
        avg, n = logps / lengths.clamp(min=1), logps.shape[0] // 2
        return orpo_loss(avg[:n], avg[n:], self.config.resolved_beta)


def _pair_metrics(out: PairLosses, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> Metrics:
    """Sums over the pairs of the micro-batch; the loop divides them by the pair count of the step."""
    return {
        "rewards/chosen": out.chosen_rewards.sum(),
        "rewards/rejected": out.rejected_rewards.sum(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum(),
        "logps/chosen": chosen_logps.sum(),
        "logps/rejected": rejected_logps.sum(),
    }


def build(config: PreferenceConfig, *, pad_token_id: int, is_peft: bool, loss_chunk_size: int = 0,
          **_: object) -> PairObjective:  # fmt: skip
    """The registry's builder: a full fine-tune (no adapter to disable) always precomputes its reference."""
    precompute = config.precompute_ref_log_probs or not is_peft
    return PairObjective(config, pad_token_id, precompute=precompute, loss_chunk_size=loss_chunk_size)
