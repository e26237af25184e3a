"""The loop's step maths (aift.training.step), without a model: schedule, windows, normalisation, accounting."""

from __future__ import annotations

import pytest
import torch

from aift.training.checkpoint import TrainerState
from aift.training.optimizers import linear_warmup_then_decay
from aift.training.step import (
    count_step,
    is_log_step,
    loss_scale,
    lr_factor,
    next_epoch_if_done,
    pad_plan,
    step_window,
)


def test_lr_factor_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(2, 6, s) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(0, 4, 0) == 1.0
    assert lr_factor(0, 4, 9) == 0.0  # past the end: never negative


def test_the_scheduler_follows_lr_factor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = linear_warmup_then_decay(optimizer, 2, 6)
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.0 * lr_factor(2, 6, s) for s in range(6)])


def test_pad_plan_repeats_micro_batches_up_to_a_multiple_of_the_processes():
    plan = [[0], [1], [2]]
    assert pad_plan(plan, 1) == (plan, 3)
    assert pad_plan(plan, 3) == (plan, 3)
    padded, real = pad_plan(plan, 2)
    assert (padded, real) == ([[0], [1], [2], [0]], 3)
    assert plan == [[0], [1], [2]]  # the planner's list is not changed


def test_step_window_deals_micro_batches_round_robin_and_weighs_padding_zero():
    plan, real = pad_plan([[i] for i in range(5)], 2)  # 6 micro-batches, the last repeats the first
    window, mine, weights = step_window(plan, real, 4, 4, rank=1, world=2)
    assert window == [[4], [0]]
    assert list(mine) == [5] and weights == [0.0]
    window, mine, weights = step_window(plan, real, 0, 4, rank=0, world=2)
    assert len(window) == 4 and list(mine) == [0, 2] and weights == [1.0, 1.0]


def test_every_micro_batch_of_an_epoch_is_taken_once():
    plan, real = pad_plan([[i] for i in range(7)], 2)
    taken, start = [], 0
    while start < len(plan):
        window, *_ = step_window(plan, real, start, 4, 0, 2)
        for rank in range(2):
            _, mine, weights = step_window(plan, real, start, 4, rank, 2)
            taken += [j for j, w in zip(mine, weights, strict=True) if w]
        start += len(window)
    assert sorted(taken) == list(range(7))


def test_loss_scale_makes_the_step_loss_a_mean_over_trained_tokens_of_all_processes():
    token_losses = torch.arange(1.0, 11.0)  # 10 trained tokens in 3 micro-batches on 2 processes
    parts = [token_losses[:3], token_losses[3:4], token_losses[4:]]
    world = 2
    scaled = sum(p.sum() * loss_scale(10, world) for p in parts) / world  # DDP averages over processes
    assert scaled.item() == pytest.approx(token_losses.mean().item())
    assert loss_scale(0, 1) == 1.0  # no trained token: no division by zero


def test_count_step_and_epoch_change():
    state = TrainerState()
    count_step(state, micro_batches=4, real_tokens=100, loss=2.5, seconds=0.5)
    count_step(state, micro_batches=2, real_tokens=50, loss=2.0, seconds=0.25)
    assert (state.step, state.micro_batch, state.tokens, state.last_loss) == (2, 6, 150, 2.0)
    assert state.train_time_s == pytest.approx(0.75)
    next_epoch_if_done(state, plan_length=7)
    assert (state.epoch, state.micro_batch) == (0, 6)
    next_epoch_if_done(state, plan_length=6)
    assert (state.epoch, state.micro_batch) == (1, 0)


def test_is_log_step():
    assert [s for s in range(1, 8) if is_log_step(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 4) if is_log_step(s, 0, 3)] == [3]
