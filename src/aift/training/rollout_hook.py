"""The loop's rollout hook: an objective that makes its batch at train time (GRPO samples completions there).

An objective that defines ``rollout(batches, ctx) -> list[dict]`` gets each step's collated micro-batches of
this process before the loop counts them, and returns the batches the loss is computed on (the same number,
in the same order). :class:`Rollout` calls it with the model unwrapped (no DDP wrapper), in eval mode (no
dropout) and under ``torch.no_grad``, and puts the model back in train mode after. ``ctx`` is a
:class:`~aift.training.objectives.StepContext`: the step, the epoch, the plan indices of the micro-batches
(seed from them, and a resumed run samples the same), the data-parallel rank layout and its collectives.

An objective that defines ``state_dict()`` / ``load_state_dict(state)`` has that state saved in every checkpoint,
one entry per process (``objective_state.pt``), and restored on resume.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from aift.training import checkpoint as ckpt
from aift.training.backends import Backend
from aift.training.objectives import Objective, StepContext


def has_rollout(objective: Objective) -> bool:
    return callable(getattr(objective, "rollout", None))  # optional in the Protocol: most objectives have none


def has_state(objective: Objective) -> bool:
    return callable(getattr(objective, "state_dict", None)) and callable(getattr(objective, "load_state_dict", None))


def objective_files(objective: Objective, backend: Backend) -> dict | None:
    """A checkpoint's file of the objective's state (every process's, gathered: collective), or None."""
    if not has_state(objective):
        return None
    return ckpt.save_objective_states(backend.gather_objects(objective.state_dict()))


class Rollout:
    """Calls an objective's ``rollout`` for train steps and eval batches, and times it."""

    def __init__(self, objective: Objective, backend: Backend, seed: int) -> None:
        self.objective, self.backend, self.seed = objective, backend, seed
        self.model = backend.rollout_model()  # raises where rollouts cannot run (pipeline stages, shards)

    def context(self, step: int, epoch: int, indices: Sequence[int], is_eval: bool = False) -> StepContext:
        backend = self.backend
        return StepContext(
            model=self.model,
            device=backend.device,
            autocast=backend.autocast,
            step=step,
            epoch=epoch,
            micro_batches=tuple(indices),
            seed=self.seed,
            dp_rank=backend.dp_rank,
            dp_world=backend.dp_world,
            reduce_sum=backend.reduce_sum,
            all_gather=backend.all_gather,
            is_main=backend.is_main,
            is_eval=is_eval,
        )

    def train(self, batches: list[dict], step: int, epoch: int, indices: Sequence[int]) -> tuple[list[dict], float]:
        """(the step's batches as the objective makes them, seconds it took)."""
        started = time.perf_counter()
        with self.backend.evaluating(), torch.no_grad():
            out = self.objective.rollout(batches, self.context(step, epoch, indices))
        if len(out) != len(batches):
            raise RuntimeError(f"internal: rollout returned {len(out)} batches for {len(batches)}")
        return out, time.perf_counter() - started

    def eval(self, batch: dict, step: int, index: int) -> dict:
        """An eval batch (the loop is already in eval mode and no_grad); ``index``: its place in the eval order."""
        return self.objective.rollout([batch], self.context(step, 0, (index,), is_eval=True))[0]
