"""The step maths of the training loop, as plain functions: learning-rate schedule, which micro-batches a
step takes on which process, the loss normalisation by trained tokens, each micro-batch's dropout seed,
and the step accounting.

:mod:`aift.training.loop` calls them once per optimizer step; they hold no state of their own.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from aift.training.checkpoint import TrainerState


def lr_factor(warmup_steps: int, total_steps: int, step: int) -> float:
    """The peak learning rate's factor after ``step`` optimizer steps: linear warmup, then linear decay to 0."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def pad_plan(plan: list, world: int) -> tuple[list, int]:
    """The epoch's plan padded to a multiple of ``world`` micro-batches, and its real length.

    Every process runs as many micro-batches (DDP all-reduces in each backward); the padding repeats
    micro-batches that get weight 0, so no example counts twice in an epoch.
    """
    real = len(plan)
    if world > 1 and real % world:
        plan = plan + plan[: world - real % world]
    return plan, real


def step_window(plan: list, real: int, start: int, micro_per_step: int, rank: int, world: int):
    """One optimizer step's micro-batches from ``start``: (the window, this rank's plan indices, their weights).

    Micro-batches are dealt round-robin over processes; padding (index >= ``real``) weighs 0.
    """
    window = plan[start : start + micro_per_step]
    mine = range(start, start + len(window))[rank::world]
    return window, mine, [1.0 if j < real else 0.0 for j in mine]


def loss_scale(trained_tokens: float, world: int) -> float:
    """Factor of each micro-batch's loss sum: the step's loss is the mean over all its trained tokens.

    DDP averages gradients over processes; multiplying by ``world`` makes that a plain sum.
    """
    return world / max(trained_tokens, 1)


@contextlib.contextmanager
def micro_batch_rng(seed: int, epoch: int, index: int, device: torch.device):
    """Runs a micro-batch's forward and backward on an RNG seeded from (seed, epoch, its index in the plan).

    Its dropout masks (LoRA, attention, hidden) are then those of that micro-batch, whichever process runs it
    and whatever ran before: N processes x batch B draw what 1 process x batch B x N accumulation draws.
    Gradient checkpointing replays the same masks (torch.utils.checkpoint restores the RNG state it saw).
    The RNG streams outside are left as they were (fork_rng), so resuming a run stays exact.
    """
    digest = hashlib.sha256(f"aift-dropout:{seed}:{epoch}:{index}".encode()).digest()
    devices = [device.index or 0] if device.type == "cuda" else []  # fork_rng always forks the CPU's
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        yield


def count_step(state: TrainerState, micro_batches: int, real_tokens: int, loss: float, seconds: float) -> None:
    """Step accounting after an optimizer step: steps, data position, tokens, last loss, training time."""
    state.step += 1
    state.micro_batch += micro_batches
    state.tokens += real_tokens
    state.last_loss = loss
    state.train_time_s += seconds


def next_epoch_if_done(state: TrainerState, plan_length: int) -> None:
    """Moves the data position to the next epoch's start once the epoch's plan is used up."""
    if state.micro_batch >= plan_length:
        state.epoch, state.micro_batch = state.epoch + 1, 0


def is_log_step(step: int, logging_steps: int, total_steps: int) -> bool:
    """A train record is written every ``logging_steps`` steps and after the last one."""
    return bool(logging_steps and step % logging_steps == 0) or step == total_steps
