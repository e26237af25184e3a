"""The rollout helpers of GRPO: the trainable batch, log-probs as TRL scores them, seeds, and what is logged."""

from __future__ import annotations

import pytest
import torch

from aift.training.grpo_loss import group_advantages
from aift.training.grpo_rollout import (
    RolloutCache,
    collate_rollout,
    completion_logps,
    completion_records,
    generation_index,
    repeat_steps,
    rollout_logps,
    rollout_metrics,
    sampling_seed,
    step_advantages,
    zero_std_warning,
)

PAD, EOS = 0, 2


def test_collate_rollout_pads_prompts_left_and_completions_right():
    batch = collate_rollout([[5, 6, 7], [8]], [[9, EOS], [10, 11, 12]], PAD, [EOS], mask_truncated=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, EOS, PAD], [PAD, PAD, 8, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["truncated"].tolist() == [False, True]
    assert (batch["logits_to_keep"], batch["num_tokens"], batch["num_completion_tokens"]) == (3, 9, 5)


def test_collate_rollout_masks_truncated_completions_when_asked():
    batch = collate_rollout([[5], [6]], [[9, EOS], [10, 11]], PAD, [EOS], mask_truncated=True)
    assert batch["completion_mask"].tolist() == [[1, 1], [0, 0]]
    assert batch["num_completion_tokens"] == 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]  # the loss mask only: same loss as TRL's


def test_completion_logps_equal_trl_selective_log_softmax_and_entropy():
    from trl.trainer.utils import selective_log_softmax_and_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 4
    ids = torch.randint(0, 50, (3, 5), generator=g)
    for temperature in (1.0, 0.7):
        ours, our_entropy = completion_logps(logits, ids, temperature, with_entropy=True)
        theirs, their_entropy = selective_log_softmax_and_entropy(logits, ids, temperature=temperature)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
        assert torch.allclose(our_entropy, their_entropy, atol=1e-5, rtol=0)
    greedy, _ = completion_logps(logits, ids, 0.0)
    assert torch.allclose(greedy, completion_logps(logits, ids, 1.0)[0])


def test_completion_logps_gradient_flows_to_the_logits():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    logps, entropy = completion_logps(logits, torch.zeros(2, 3, dtype=torch.long), with_entropy=True)
    logps.sum().backward()
    assert logits.grad.abs().sum() > 0 and not entropy.requires_grad


def test_sampling_seed_depends_on_seed_epoch_and_plan_index_only():
    seeds = {sampling_seed(s, e, j) for s in (1, 2) for e in (0, 1) for j in range(4)}
    assert len(seeds) == 16
    assert sampling_seed(42, 1, 3) == sampling_seed(42, 1, 3)
    assert 0 <= sampling_seed(42, 1, 3) < 2**63


def test_zero_std_warning_only_when_most_groups_are_flat():
    assert zero_std_warning(0.5, 3) is None
    message = zero_std_warning(0.75, 3)
    assert "step 3: 75% of the prompt groups" in message and "SFT" in message and "graded reward" in message


def test_completion_records_hold_whole_groups():
    table = torch.tensor([[1.0], [0.0], [float("nan")], [1.0], [0.0], [0.0]])
    adv = group_advantages(table, [1.0], 2, "group")
    records = completion_records(7, ["p0", "p0", "p1", "p1", "p2", "p2"], list("abcdef"), table, ["em"], adv, 2, 2)
    assert [(r["group"], r["prompt"], r["completion"]) for r in records] == [
        (0, "p0", "a"), (0, "p0", "b"), (1, "p1", "c"), (1, "p1", "d"),
    ]  # fmt: skip
    assert records[2]["rewards"] == {"em": None} and records[2]["reward"] is None and records[2]["advantage"] == 0.0
    assert records[0]["step"] == 7 and records[0]["advantage"] > 0 > records[1]["advantage"]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_two_processes_equal_one_process_with_accumulation(scale_rewards):
    """4 micro-batches of 2 groups of 4: on 1 process, or 2 per process on 2; the last one is epoch padding."""
    g, weights = 4, [1.0, 0.5]
    table = torch.randint(0, 4, (32, 2), generator=torch.Generator().manual_seed(0)).float()
    valid = torch.ones(32, dtype=torch.bool)
    valid[24:] = False  # micro-batch 3 repeats earlier data: weight 0 in the loop, out of the statistics
    one, _, _ = step_advantages(table, valid, weights, g, scale_rewards)
    # the plan deals micro-batches round-robin: rank 0 gets 0 and 2, rank 1 gets 1 and 3
    rows = {0: [*range(0, 8), *range(16, 24)], 1: [*range(8, 16), *range(24, 32)]}
    tables = {r: table[idx] for r, idx in rows.items()}
    valids = {r: valid[idx] for r, idx in rows.items()}
    passed = {r: tables[r].clone() for r in (0, 1)}  # what each rank hands to all_gather: padding rows NaN
    for r in (0, 1):
        passed[r][~valids[r]] = float("nan")

    def all_gather_for(rank):
        def all_gather(x):
            parts = valids if x.dtype == torch.bool else passed
            assert torch.equal(x.nan_to_num(-1), parts[rank].nan_to_num(-1))  # the fake gathers what ranks pass
            return torch.cat([parts[0], parts[1]])

        return all_gather

    for rank in (0, 1):
        local, step, step_valid = step_advantages(
            tables[rank], valids[rank], weights, g, scale_rewards, all_gather_for(rank), rank
        )
        assert torch.allclose(local.advantages, one.advantages[rows[rank]], atol=1e-6, rtol=0)
    assert step_valid.sum() == 24
    assert (one.advantages[24:] == 0).all()
    lengths, truncated = torch.arange(32), torch.zeros(32, dtype=torch.bool)
    _, whole, _ = step_advantages(table, valid, weights, g, scale_rewards)
    metrics = rollout_metrics(table, ["a", "b"], whole, lengths, truncated, valid)
    assert metrics["completions/max_length"] == 23  # padding rows left out
    assert metrics["reward"] == pytest.approx((table[:24] @ torch.tensor(weights)).mean().item())


def test_num_iterations_repeats_each_step_and_maps_back_to_its_generation():
    plan = ["a", "b", "c", "d", "e"]  # micro-batches; 2 per step
    repeated = repeat_steps(plan, 2, 3)
    assert repeated == ["a", "b", "a", "b", "a", "b", "c", "d", "c", "d", "c", "d", "e", "e", "e"]
    mapped = [generation_index(j, len(plan), 2, 3) for j in range(len(repeated))]
    assert [plan[g] for g, _ in mapped] == repeated
    assert [it for _, it in mapped] == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert repeat_steps(plan, 2, 1) == plan and generation_index(3, 5, 2, 1) == (3, 0)


def test_rollout_cache_round_trips_through_a_checkpoint(tmp_path):
    cache = RolloutCache()
    assert cache.get((0, 0)) is None and cache.state_dict() == {}
    batches = [{"input_ids": torch.tensor([[1, 2]]), "old_logps": torch.tensor([[-0.5]]), "logits_to_keep": 1}]
    cache.put((0, 4), batches)
    assert cache.get((0, 4)) is batches and cache.get((0, 6)) is None
    torch.save(cache.state_dict(), tmp_path / "rollout.pt")
    restored = RolloutCache()
    restored.load_state_dict(torch.load(tmp_path / "rollout.pt"))
    got = restored.get((0, 4))
    assert torch.equal(got[0]["old_logps"], batches[0]["old_logps"]) and got[0]["logits_to_keep"] == 1


def test_rollout_logps_of_padded_rows_equal_each_sequence_scored_alone(tiny_model_dir):
    """Left-padded prompts, right-padded completions: each row's completion log-probs are its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts, completions = [[5, 6, 7, 8], [9], [10, 11]], [[20, 21, EOS], [22], [23, 24, 25, 26]]
    batch = collate_rollout(prompts, completions, PAD, [EOS])
    with torch.no_grad():
        logps, entropy = rollout_logps(model, batch, temperature=0.8, with_entropy=True)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            logits = model(torch.tensor([p + c])).logits[:, len(p) - 1 : -1]
            alone, alone_entropy = completion_logps(logits, torch.tensor([c]), 0.8, with_entropy=True)
            assert torch.allclose(logps[i, : len(c)], alone[0], atol=1e-5, rtol=0)
            assert torch.allclose(entropy[i, : len(c)], alone_entropy[0], atol=1e-5, rtol=0)
    assert logps.shape == batch["completion_mask"].shape
