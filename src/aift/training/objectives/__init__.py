"""Training objectives: what the one loop minimises for a micro-batch, one file per family.

An objective turns a collated micro-batch into ``(loss_sum, metric_sums)`` and says by what the loop divides
that sum (``count``): the SFT objective sums per-token cross-entropy over trained tokens (count = trained
tokens), the preference objectives sum per-pair (or per-example, KTO) losses (count = pairs). Summing over
micro-batches and processes, then dividing by the total count, makes gradient accumulation and data
parallelism equal one big batch, whatever the objective.

- :mod:`.sft`: supervised fine-tuning (no options of its own);
- :mod:`.pairs`: DPO, ORPO and SimPO on preference pairs, and :class:`~.pairs.PreferenceConfig`, the
  ``preference:`` options these and KTO share;
- :mod:`.kto`: KTO on labelled, unpaired examples;
- :mod:`.reference`: what the reference-based families share (the planner, the reference log-probs);
- :mod:`.logps`: answer log-probs from a model (plain, fused-chunked, or with a shared prompt).

:mod:`aift.training.methods` registers each method (name, summary, data task, options, how to build it).
Adding a method is a family file that satisfies :class:`Objective` plus a line in that registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Autocast = Callable[[], contextlib.AbstractContextManager]
Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepContext:
    """What an objective's ``rollout`` knows of the step it prepares (built by the loop, see its docstring).

    ``micro_batches`` are the plan indices of this process's micro-batches (the same on a resumed run), so a
    rollout that seeds its sampling from (seed, epoch, index) samples the same completions after a resume.
    """

    model: torch.nn.Module  # unwrapped (no DDP wrapper), in eval mode, under no_grad
    device: torch.device
    autocast: Autocast
    step: int  # the optimizer step being prepared (0-based: steps done so far)
    epoch: int
    micro_batches: tuple[int, ...]  # plan indices of this process's micro-batches (padding repeats one)
    seed: int
    dp_rank: int
    dp_world: int
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]  # sum over data-parallel replicas
    all_gather: Callable[[torch.Tensor], torch.Tensor]  # concatenated over replicas along dim 0, rank order
    is_main: bool
    is_eval: bool = False  # an eval batch: ``micro_batches`` holds its index in the eval order, epoch is 0


class Objective(Protocol):
    """What the loop asks of an objective (see the module docstring).

    An objective MAY also define ``rollout(batches, ctx: StepContext) -> list[dict]``: the loop calls it on
    each step's collated micro-batches before counting them, and on each eval batch (GRPO generates there);
    and ``state_dict()`` / ``load_state_dict(state)``, which checkpoints save and restore
    (:mod:`aift.training.rollout_hook`).
    """

    name: str  # the method's registry name: sft, dpo, ...
    config: Any  # its options dataclass (Method.config_cls), None for SFT

    def check(self, examples: Any) -> None: ...
    def planner(self, examples: Any, config: Any, pad_token_id: int, mask: str) -> Any: ...
    def count(self, batch: dict) -> int: ...
    def loss_sum(self, model: torch.nn.Module, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, Metrics]: ...
    def eval_batches(
        self, examples: Any, batch_size: int, pad_token_id: int, rank: int, world: int
    ) -> Iterable[dict]: ...


def to_device(batch: dict, device) -> dict:
    """A collated batch (tensors, nested KL batch) on ``device``."""
    return {
        k: (to_device(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v)
        for k, v in batch.items()
    }
