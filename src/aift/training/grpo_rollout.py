"""The rollout side of GRPO as plain functions: sampled completions -> a trainable batch, log-probs, step stats.

The GRPO objective (``training/objectives/grpo.py``) samples completions with ``aift.inference.generation``,
scores them with :mod:`aift.training.rewards` and computes advantages with :mod:`aift.training.grpo_loss`;
what it needs between those steps is here, independent of the loop:

- :func:`collate_rollout`: prompts (left-padded) and completions (right-padded) in one row each, as TRL does,
  with the completion mask (truncated completions masked out with ``mask_truncated_completions``); with
  ``group_size`` also each group as one row, its prompt once (:mod:`aift.training.prompt_sharing`), which the
  forwards of :func:`rollout_logps` then take instead;
- :func:`completion_logps`: per-token log-probs (and entropies) of the completion tokens under the
  temperature-scaled distribution, as TRL's ``selective_log_softmax_and_entropy``;
- :func:`sampling_seed`: the seed of a micro-batch's sampling, a function of (seed, epoch, plan index) only, so
  that 1 process and N processes, and a resumed run, sample the same completions;
- :func:`repeat_steps`, :func:`generation_index`, :class:`RolloutCache`: ``num_iterations`` (μ) as TRL's
  RepeatSampler does it: each step's micro-batches are planned μ times in a row, generated on the first pass and
  replayed (with the old log-probs) on the others; the cache goes into checkpoints, so a resume mid-cycle is exact;
- :func:`step_advantages`: advantages over the whole step (all processes' completions; groups never span
  processes), so 2 processes equal 1 process with gradient accumulation;
- :func:`rollout_metrics`, :func:`zero_std_warning`, :func:`completion_records`: what is logged each step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from aift.errors import NotAvailableError
from aift.training.grpo_loss import Advantages, group_advantages, nanstd, truncated_completions
from aift.training.loss import split_causal_lm
from aift.training.prompt_sharing import collate_groups, gather_sequences, segment_mask

ZERO_STD_WARN_FRACTION = 0.5  # warn when more than this share of a step's groups has no reward spread


# ---------------------------------------------------------------------- batch


def collate_rollout(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    stop_ids: Sequence[int],
    mask_truncated: bool = False,
    group_size: int | None = None,
) -> dict:
    """One row per completion: ``[left-padded prompt | right-padded completion]``.

    Keys: ``input_ids``/``attention_mask``/``position_ids`` ``[B, P + C]`` (positions count real tokens from 0,
    as generation's do), ``completion_mask`` ``[B, C]`` (the trained tokens: the completion including its EOS;
    all 0 for a truncated completion when ``mask_truncated``), ``truncated`` ``[B]``, ``logits_to_keep`` (C),
    ``num_tokens`` (real tokens) and ``num_completion_tokens`` (trained tokens).

    ``group_size``: each run of that many rows shares one prompt (a GRPO group); the batch then also holds the
    groups as shared rows (``shared`` : :func:`~aift.training.prompt_sharing.collate_groups`' keys), on which
    :func:`rollout_logps` runs its forward: the same log-probs for fewer tokens.
    """
    width_p = max(len(p) for p in prompt_ids)
    width_c = max(1, max(len(c) for c in completion_ids))
    rows, attention, completion_mask = [], [], []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        pad_p, pad_c = width_p - len(p), width_c - len(c)
        rows.append([pad_token_id] * pad_p + list(p) + list(c) + [pad_token_id] * pad_c)
        attention.append([0] * pad_p + [1] * (len(p) + len(c)) + [0] * pad_c)
        completion_mask.append([1] * len(c) + [0] * pad_c)
    attention_mask = torch.tensor(attention, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    truncated = truncated_completions(completion_ids, [*stop_ids, pad_token_id])
    mask = torch.tensor(completion_mask, dtype=torch.long)
    if mask_truncated:
        mask = mask * (~truncated).unsqueeze(1).long()
    batch = {
        "input_ids": torch.tensor(rows, dtype=torch.long),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_mask": mask,
        "truncated": truncated,
        "logits_to_keep": width_c,
        "num_tokens": int(attention_mask.sum()),
        "num_completion_tokens": int(mask.sum()),
    }
    if group_size:
        batch["shared"] = _shared_groups(prompt_ids, completion_ids, pad_token_id, width_c, group_size)
    return batch


def _shared_groups(prompt_ids, completion_ids, pad_token_id: int, width: int, group_size: int) -> dict:
    starts = range(0, len(prompt_ids), group_size)
    if len(prompt_ids) % group_size or any(
        list(p) != list(prompt_ids[s]) for s in starts for p in prompt_ids[s : s + group_size]
    ):
        raise ValueError(f"internal: the rows do not form groups of {group_size} with one prompt each")
    prompts = [list(prompt_ids[s]) for s in starts]
    groups = [[list(c) for c in completion_ids[s : s + group_size]] for s in starts]
    return collate_groups(prompts, groups, pad_token_id, width)


def completion_logps(
    logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``[B, C]`` of ``completion_ids`` under ``softmax(logits / temperature)`` (fp32).

    ``logits`` ``[B, C, V]`` are those that predict the completion tokens (positions ``P - 1 .. P + C - 2`` of
    the rollout row). The entropies (of the same distribution, no gradient) come with ``with_entropy``.
    Temperature 0 (greedy sampling) scores at temperature 1: greedy decoding has no distribution of its own.
    """
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = log_norm - (probs * logits).sum(-1)
    return logps, entropy


def rollout_logps(
    model, batch: dict, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``[B, C]`` of a :func:`collate_rollout` batch's completions under ``model``.

    One forward of the whole rows; only the ``C + 1`` last positions' logits are computed (the position before
    the first completion token predicts it). Used for the loss (with gradients), and under ``no_grad`` for the
    old policy (``num_iterations`` > 1) and the reference (``beta`` > 0).
    """
    width = batch["logits_to_keep"]
    if "shared" in batch:
        logits = _shared_logits(model, batch["shared"])
    else:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs, use_cache=False, logits_to_keep=width + 1).logits[:, :-1]
    return completion_logps(logits, batch["input_ids"][:, -width:], temperature, with_entropy)


def _shared_logits(model, shared: dict) -> torch.Tensor:
    """``[B, C, V]`` logits predicting each completion's tokens, from one forward of the groups' shared rows."""
    _, head = split_causal_lm(model)
    inputs = {"input_ids": shared["input_ids"], "position_ids": shared["position_ids"],
              "attention_mask": segment_mask(shared["segment_ids"])}  # fmt: skip
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return head(gather_sequences(out.hidden_states[-1], shared["gather_index"]))


def can_share_prompt(model) -> bool:
    """Whether :func:`rollout_logps` can run a group's prompt once for ``model``: its attention takes a 4-D mask
    (SDPA, eager; not flash-attention or aift's segment attention) and its logits are ``hidden @ lm_head``."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    try:
        split_causal_lm(model)
    except NotAvailableError:
        return False
    return True


def sampling_seed(seed: int, epoch: int, plan_index: int) -> int:
    """The sampling seed of micro-batch ``plan_index`` of ``epoch``: the same on any number of processes."""
    digest = hashlib.sha256(f"grpo-sampling:{seed}:{epoch}:{plan_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------- num_iterations (μ)


def repeat_steps(plan: list, micro_per_step: int, num_iterations: int) -> list:
    """The plan with each optimizer step's micro-batches (``micro_per_step`` of them) repeated μ times in a row."""
    steps = [plan[i : i + micro_per_step] for i in range(0, len(plan), micro_per_step)]
    return [mb for step in steps for _ in range(num_iterations) for mb in step]


def generation_index(plan_index: int, plan_len: int, micro_per_step: int, num_iterations: int) -> tuple[int, int]:
    """(index in the plan of ``plan_len`` micro-batches before :func:`repeat_steps`, iteration 0..μ-1).

    The first is what :func:`sampling_seed` takes, so μ does not change which completions a prompt gets. The
    last step of an epoch may hold fewer micro-batches.
    """
    cycle_len = micro_per_step * num_iterations
    last_start = (plan_len // micro_per_step) * micro_per_step  # where a shorter last step starts
    if plan_index >= last_start * num_iterations:
        iteration, position = divmod(plan_index - last_start * num_iterations, plan_len - last_start)
        return last_start + position, iteration
    cycle, offset = divmod(plan_index, cycle_len)
    iteration, position = divmod(offset, micro_per_step)
    return cycle * micro_per_step + position, iteration


class RolloutCache:
    """This process's rollout of the current μ-cycle: generated on iteration 0, replayed on the others."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None  # (epoch, first generation index of the cycle's step)
        self.batches: list[dict] | None = None

    def get(self, key: tuple[int, int]) -> list[dict] | None:
        return self.batches if key == self.key else None

    def put(self, key: tuple[int, int], batches: list[dict]) -> None:
        self.key, self.batches = key, batches

    def state_dict(self) -> dict:
        """For the checkpoint: tensors on the CPU (a resumed run replays what this one generated)."""
        if self.batches is None:
            return {}
        cpu = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in self.batches]
        return {"key": list(self.key), "batches": cpu}

    def load_state_dict(self, state: dict) -> None:
        self.key = tuple(state["key"]) if state else None
        self.batches = state.get("batches") if state else None


# ---------------------------------------------------------------------- advantages over the step


def step_advantages(
    rewards_per_func: torch.Tensor,
    valid: torch.Tensor,
    weights: Sequence[float],
    num_generations: int,
    scale_rewards: str,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
) -> tuple[Advantages, Advantages, torch.Tensor]:
    """(this process's advantages, the whole step's, the whole step's ``valid``) from this process's rewards.

    ``rewards_per_func`` ``[n, F]`` are this process's completions of the step (its micro-batches in plan order,
    each prompt's group adjacent and whole); ``valid`` ``[n]`` is False on the rows of padding micro-batches (the
    duplicates that fill the last step of an epoch), which are left out of every mean and std. ``all_gather``
    concatenates a tensor of every process in rank order (each holds the same ``n``); None: one process.
    Group statistics do not depend on how the groups are spread over processes, and ``batch`` scaling sees all of
    them, so the result equals one process running every micro-batch with gradient accumulation.
    """
    rewards = rewards_per_func.clone()
    rewards[~valid] = math.nan
    if all_gather is not None:
        rewards, valid = all_gather(rewards), all_gather(valid)
    step = group_advantages(rewards, weights, num_generations, scale_rewards)
    n = rewards_per_func.shape[0]
    mine = slice(rank * n, (rank + 1) * n)
    local = Advantages(step.advantages[mine], step.rewards[mine], step.std[mine], step.zero_std[mine])
    return local, step, valid


# ---------------------------------------------------------------------- logging


def rollout_metrics(
    rewards_per_func: torch.Tensor,
    names: Sequence[str],
    advantages: Advantages,
    completion_lengths: torch.Tensor,
    truncated: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> dict[str, float]:
    """The step's reward and completion statistics over the whole global batch (TRL's metric names).

    ``valid`` (default: all) leaves the rows of padding micro-batches out.
    """
    if valid is not None:
        rewards_per_func, completion_lengths, truncated = (
            rewards_per_func[valid],
            completion_lengths[valid],
            truncated[valid],
        )
        advantages = Advantages(
            *(x[valid] for x in (advantages.advantages, advantages.rewards, advantages.std, advantages.zero_std))
        )
    metrics = {}
    for j, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, j]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, j]).item()
    lengths = completion_lengths.float()
    metrics.update(
        {
            "reward": torch.nanmean(advantages.rewards).item(),
            "reward_std": nanstd(advantages.rewards).item(),
            "frac_reward_zero_std": advantages.zero_std.float().mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": truncated.float().mean().item(),
        }
    )
    return {k: (v if math.isfinite(v) else 0.0) for k, v in metrics.items()}


def zero_std_warning(frac_zero_std: float, step: int) -> str | None:
    """The warning to log when most groups of a step have all-equal rewards (advantage 0: nothing is learnt)."""
    if frac_zero_std <= ZERO_STD_WARN_FRACTION:
        return None
    return (
        f"step {step}: {frac_zero_std:.0%} of the prompt groups got the same reward for every completion, so their "
        "advantage is 0 and they teach nothing. Warm-start with a short SFT on the task, or use a graded reward "
        "(partial credit, a format reward) so that completions of one prompt differ."
    )


def completion_records(
    step: int,
    prompts: Sequence,
    completions: Sequence,
    rewards_per_func: torch.Tensor,
    names: Sequence[str],
    advantages: Advantages,
    num_generations: int,
    num_prompts: int,
) -> list[dict]:
    """``completions.jsonl`` lines: the first ``num_prompts`` prompts of the step, each with its whole group."""
    records = []
    for i in range(min(num_prompts * num_generations, len(completions))):
        rewards = {n: _json_float(rewards_per_func[i, j]) for j, n in enumerate(names)}
        records.append(
            {
                "step": step,
                "group": i // num_generations,
                "prompt": prompts[i],
                "completion": completions[i],
                "rewards": rewards,
                "reward": _json_float(advantages.rewards[i]),
                "advantage": _json_float(advantages.advantages[i]),
            }
        )
    return records


def _json_float(x: torch.Tensor) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None
