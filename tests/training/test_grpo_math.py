"""aift's GRPO math against TRL 1.16's ``GRPOTrainer`` on the same tensors: loss, gradients, metrics, advantages.

TRL computes the loss in ``_compute_loss`` and the advantages in ``_generate_and_score_completions``, methods
of a trainer that also runs the model. They are called here on a trainer built without ``__init__`` (only
the attributes they read are set), with a stand-in model that returns fixed per-token log-probs and a
stand-in ``_generate`` that returns fixed completions, so TRL's own code (not a copy of its formulas) is what
aift is compared with. Two micro-batches make one accumulated step: TRL's summed micro-batch losses must equal
aift's ``Σ loss_sum / Σ count`` (the loop's convention), and so must their gradients.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from aift.training.grpo_loss import (
    aggregate,
    group_advantages,
    grpo_loss,
    metrics_for_loop,
    total_rewards,
    truncated_completions,
)
from aift.training.grpo_rollout import rollout_metrics

P, T = 3, 7  # prompt and completion positions
MICRO, B = 2, 4  # micro-batches per step, completions per micro-batch


class _FixedLogps:
    """A stand-in model: the per-token log-probs and entropies of micro-batch k for completion ids all equal to k."""

    def __init__(self) -> None:
        self.table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.training = True
        self.is_gradient_checkpointing = False

    def __call__(self, input_ids, **kwargs):
        logps, entropy = self.table[int(input_ids[0, -1])]
        pad = torch.zeros(logps.shape[0], P, dtype=logps.dtype)
        return SimpleNamespace(log_probs=torch.cat([pad, logps], 1), entropy=torch.cat([pad, entropy], 1))


def _bare_trainer(**attrs):
    from accelerate import Accelerator
    from trl import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
    trainer.accelerator = Accelerator(cpu=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    defaults = dict(
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=MICRO,
    )  # fmt: skip
    for key, value in {**defaults, **attrs}.items():
        setattr(trainer, key, value)
    return trainer


def _micro_batches(seed: int, with_old: bool, with_ref: bool) -> list[dict]:
    """Two micro-batches of B completions: ragged masks (one row fully masked), logps, advantages."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(MICRO):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = 0 if k == 1 else lengths[0]  # a masked (truncated) completion
        mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
        logps = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_()
        batch = {
            "logps": logps,
            "entropy": torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
            "mask": mask,
            "advantages": torch.randn(B, generator=g, dtype=torch.float64),
        }
        noise = torch.randn(B, T, generator=g, dtype=torch.float64)
        if with_old:  # a policy that has moved: ratios well outside [0.8, 1.2] for some tokens
            shift = 0.5 * torch.randn(B, 1, generator=g, dtype=torch.float64)  # moves whole sequences (GSPO)
            batch["old_logps"] = logps.detach() + 0.3 * noise + shift
            # row 1 clipped above (ratio ~1.65, advantage > 0), row 2 below (ratio ~0.6, advantage < 0)
            batch["old_logps"][1:3] = logps.detach()[1:3] + torch.tensor([[-0.5], [0.5]], dtype=torch.float64)
            batch["advantages"][1:3] = batch["advantages"][1:3].abs() * torch.tensor([1.0, -1.0], dtype=torch.float64)
        if with_ref:
            batch["ref_logps"] = logps.detach() - 0.2 * noise.abs() + 0.1
        batches.append(batch)
    return batches


def _trl_step(trainer, model, batches) -> torch.Tensor:
    """TRL's loss of the accumulated step: the sum of its micro-batch losses (each already scaled for accumulation)."""
    num_items = sum(b["mask"].sum() for b in batches)
    total = 0
    for k, b in enumerate(batches):
        inputs = {
            "prompt_ids": torch.zeros(B, P, dtype=torch.long),
            "prompt_mask": torch.ones(B, P, dtype=torch.long),
            "completion_ids": torch.full((B, T), k),  # tells the stand-in model which micro-batch it sees
            "completion_mask": b["mask"],
            "advantages": b["advantages"],
            "num_items_in_batch": num_items,
        }
        if "old_logps" in b:
            inputs["old_per_token_logps"] = b["old_logps"]
        if "ref_logps" in b:
            inputs["ref_per_token_logps"] = b["ref_logps"]
        model.table[k] = (b["logps"], b["entropy"])
        total = total + trainer._compute_loss(model, inputs)
    return total


CASES = [
    pytest.param(loss_type, level, beta, eps_high, id=f"{loss_type}-{level}-beta{beta}-epshigh{eps_high}")
    for loss_type in ("grpo", "dapo", "dr_grpo", "bnpo")
    for level in ("token", "sequence")
    for beta in (0.0, 0.04)
    for eps_high in (None, 0.28)
]


@pytest.mark.parametrize(("loss_type", "level", "beta", "epsilon_high"), CASES)
def test_loss_gradients_and_metrics_equal_trl(loss_type, level, beta, epsilon_high):
    seed = [c.values for c in CASES].index((loss_type, level, beta, epsilon_high))
    batches = _micro_batches(seed, with_old=True, with_ref=beta > 0)
    trainer = _bare_trainer(
        beta=beta,
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=0.2,
        epsilon_high=0.2 if epsilon_high is None else epsilon_high,
        max_completion_length=T + 3,
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=MICRO),
    )
    trl_loss = _trl_step(trainer, _FixedLogps(), batches)
    trl_grads = torch.autograd.grad(trl_loss, [b["logps"] for b in batches])

    outs = [
        grpo_loss(
            b["logps"],
            b["mask"],
            b["advantages"],
            old_logps=b["old_logps"],
            ref_logps=b.get("ref_logps"),
            entropies=b["entropy"],
            loss_type=loss_type,
            epsilon=0.2,
            epsilon_high=epsilon_high,
            beta=beta,
            importance_sampling_level=level,
            max_completion_length=T + 3,
        )  # fmt: skip
        for b in batches
    ]
    count = sum(o.count for o in outs)
    ours = sum(o.loss_sum for o in outs) / count
    our_grads = torch.autograd.grad(ours, [b["logps"] for b in batches])

    assert abs(ours.item() - trl_loss.item()) < 1e-5
    for mine, theirs in zip(our_grads, trl_grads, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=0)
    assert any(g.abs().sum() > 0 for g in our_grads)

    # Metrics: TRL logs one value per micro-batch (a mean over that micro-batch); aift one per step.
    # Compare per micro-batch, each as its own "step" with its own denominators.
    metrics = trainer._metrics["train"]
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"] + (["kl"] * (beta > 0))
    for k, out in enumerate(outs):
        denominators = {name: float(out.metrics[name][1]) for name in names}
        loop_values = metrics_for_loop(out.metrics, denominators, float(out.count))
        for name in names:
            assert abs(loop_values[name].item() / float(out.count) - metrics[name][k]) < 1e-6, name
    assert min(metrics["clip_ratio/low_mean"]) > 0 and min(metrics["clip_ratio/high_mean"]) > 0  # clipping exercised


def test_two_sided_clipping_delta_equals_trl():
    batches = _micro_batches(seed=5, with_old=True, with_ref=False)
    for b in batches:
        b["old_logps"] = b["logps"].detach() - 0.6  # ratios ~1.8: above delta = 1.5
    trainer = _bare_trainer(
        beta=0.0, loss_type="dapo", importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2,
        max_completion_length=T, model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=True, delta=1.5, steps_per_generation=MICRO),
    )  # fmt: skip
    trl_loss = _trl_step(trainer, _FixedLogps(), batches)
    outs = [
        grpo_loss(b["logps"], b["mask"], b["advantages"], old_logps=b["old_logps"], loss_type="dapo", delta=1.5)
        for b in batches
    ]
    ours = sum(o.loss_sum for o in outs) / sum(o.count for o in outs)
    assert abs(ours.item() - trl_loss.item()) < 1e-5
    trl_grads = torch.autograd.grad(trl_loss, [b["logps"] for b in batches], retain_graph=True)
    our_grads = torch.autograd.grad(ours, [b["logps"] for b in batches])
    assert all(torch.allclose(m, t, atol=1e-5, rtol=0) for m, t in zip(our_grads, trl_grads, strict=True))


def test_on_policy_ratio_is_one_and_gradient_is_the_policy_gradient():
    """num_iterations=1: no old log-probs; the dapo loss is -Σ A·1 / tokens and d/dlogp = -A / tokens."""
    b = _micro_batches(seed=3, with_old=False, with_ref=False)[0]
    out = grpo_loss(b["logps"], b["mask"], b["advantages"])
    n = b["mask"].sum()
    assert torch.allclose(out.loss_sum / out.count, -(b["advantages"].unsqueeze(1) * b["mask"]).sum() / n)
    (grad,) = torch.autograd.grad(out.loss_sum / out.count, b["logps"])
    assert torch.allclose(grad, -b["advantages"].unsqueeze(1) * b["mask"] / n)


def test_aggregate_counts():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    assert [x.item() for x in aggregate(loss, mask, "dapo", 10)] == [6.0, 3.0]
    assert [x.item() for x in aggregate(loss, mask, "grpo", 10)] == [1.5 + 3.0, 2.0]
    assert [x.item() for x in aggregate(loss, mask, "dr_grpo", 10)] == [pytest.approx(0.6), 2.0]
    assert [x.item() for x in aggregate(loss, mask, "bnpo", 10)] == [2.0, 1.0]


# ---------------------------------------------------------------------- advantages


def _reward_funcs(table: torch.Tensor):
    """TRL-style reward functions returning the columns of ``table`` (NaN -> None)."""

    def make(j):
        def reward(prompts, completions, **kwargs):
            return [None if torch.isnan(v) else float(v) for v in table[:, j]]

        reward.__name__ = f"r{j}"
        return reward

    return [make(j) for j in range(table.shape[1])]


def _trl_generate_and_score(rewards_per_func, weights, num_generations, scale_rewards, completion_ids, **attrs):
    n = rewards_per_func.shape[0]
    funcs = _reward_funcs(rewards_per_func)
    trainer = _bare_trainer(
        model=_FixedLogps(), beta=0.0, num_iterations=1, num_generations=num_generations, scale_rewards=scale_rewards,
        multi_objective_aggregation="sum_then_normalize", reward_funcs=funcs, reward_func_names=[f.__name__ for f in funcs],
        reward_processing_classes=[None] * len(funcs), reward_weights=torch.tensor(weights, dtype=torch.float32),
        tools=None, environment_factories=None, environments=None, pad_to_multiple_of=None,
        _tokenizer=SimpleNamespace(pad_token_id=0), eos_token_ids=[2], mask_truncated_completions=True,
        args=SimpleNamespace(gradient_accumulation_steps=1, steps_per_generation=1, per_device_train_batch_size=n,
                             gradient_checkpointing_kwargs=None, report_to=[]),
        state=SimpleNamespace(global_step=0), _logs={"prompt": [], "completion": [], "rewards": defaultdict(list),
                                                     "advantages": [], "extra": defaultdict(list)},
        _pending_extra_logs=defaultdict(list), _pending_metrics=defaultdict(list), log_multimodal=False, **attrs,
    )  # fmt: skip
    completions = [f"c{i}" for i in range(n)]
    trainer._generate = lambda prompts: ([[5, 6]] * n, completion_ids, None, completions, None, {}, None, None)
    return trainer, trainer._generate_and_score_completions([{"prompt": f"p{i // num_generations}"} for i in range(n)])


def _rewards(seed: int, n: int, f: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 3, (n, f), generator=g).float() / 2  # ties: some groups with zero std
    table[1, 0] = float("nan")  # one function left out for one completion
    table[5, :] = float("nan")  # a completion no function scored
    table[8:12, :] = 0.5  # an all-equal group
    return table


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(scale_rewards):
    n, g, weights = 16, 4, [1.0, 0.3]
    table = _rewards(0, n, 2)
    completion_ids = [[7, 2] if i % 3 else [7, 8, 9] for i in range(n)]  # every third truncated (no EOS)
    trainer, trl = _trl_generate_and_score(table, weights, g, scale_rewards, completion_ids)
    ours = group_advantages(table, weights, g, scale_rewards)
    truncated = truncated_completions(completion_ids, [2, 0])
    assert torch.equal(~truncated, trl["completion_mask"].bool().any(dim=1))  # TRL's mask_truncated_completions
    assert torch.allclose(ours.advantages, trl["advantages"], atol=1e-5, rtol=0)
    assert ours.advantages[5] == 0 and ours.advantages[8:12].abs().max() == 0
    metrics = trainer._metrics["train"]
    logged = rollout_metrics(table, ["r0", "r1"], ours, torch.tensor([len(c) for c in completion_ids]), truncated)
    names = ["reward", "reward_std", "frac_reward_zero_std"] + [
        f"rewards/r{j}/{s}" for j in (0, 1) for s in ("mean", "std")
    ]
    for name in names:
        assert abs(logged[name] - metrics[name][0]) < 1e-6, name


def test_total_rewards_weighted_nansum():
    table = torch.tensor([[1.0, 0.5], [float("nan"), 1.0], [float("nan"), float("nan")]])
    total = total_rewards(table, [2.0, 0.5])
    assert total[:2].tolist() == [2.25, 0.5] and torch.isnan(total[2])
