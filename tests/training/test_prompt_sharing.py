"""A pair's prompt run once (prompt + chosen + rejected in one row) gives the log-probs of the two sequences."""

from __future__ import annotations

import contextlib

import pytest
import torch

from aift.training.objectives.logps import forward_logps
from aift.training.objectives.pairs import PairObjective, PreferenceConfig, dpo_loss
from aift.training.prompt_sharing import collate_shared, segment_mask, shared_prefix_length

# Prompts of different lengths, answers of different lengths, one pair whose answers share a first token.
ROWS = [
    {"chosen_input_ids": [5, 6, 7, 8, 9], "chosen_labels": [-100, -100, 7, 8, 9],
     "rejected_input_ids": [5, 6, 7, 10], "rejected_labels": [-100, -100, 7, 10]},
    {"chosen_input_ids": [11, 12, 13], "chosen_labels": [-100, 12, 13],
     "rejected_input_ids": [11, 12, 14, 15, 16, 17], "rejected_labels": [-100, 12, 14, 15, 16, 17]},
    {"chosen_input_ids": [20, 21, 22, 23, 24, 25, 26], "chosen_labels": [-100] * 5 + [25, 26],
     "rejected_input_ids": [20, 21, 22, 23, 24, 30], "rejected_labels": [-100] * 5 + [30]},
]  # fmt: skip


def test_shared_prefix_stops_at_the_answer_or_the_first_difference():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 3, 5], [-100, -100, 3, 4]) == 2  # answer starts at 2
    assert shared_prefix_length([1, 2, 3, 4], [1, 9, 3, 4], [-100, -100, -100, 4]) == 1
    assert shared_prefix_length([1, 2], [1, 2, 3], [-100, -100]) == 2


def test_one_row_per_pair_holds_fewer_tokens_and_counts_the_same():
    shared = PairObjective(PreferenceConfig(), pad_token_id=0).collate(ROWS)
    plain = PairObjective(PreferenceConfig(share_prompt=False), pad_token_id=0).collate(ROWS)
    assert shared["input_ids"].shape[0] == len(ROWS) and plain["input_ids"].shape[0] == 2 * len(ROWS)
    assert shared["input_ids"].numel() < plain["input_ids"].numel()
    assert (
        shared["num_tokens"]
        == plain["num_tokens"]
        == sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in ROWS)
    )
    assert torch.equal(shared["labels"], plain["labels"])  # the virtual sequences are the plain rows
    mask = collate_shared(ROWS[:1], 0)["attention_mask"][0, 0]
    assert not mask[5:, 2:5].any()  # rejected answer (row positions 5..) never sees the chosen answer (2..4)
    assert mask[5:, :2].all()  # but sees the prompt


@pytest.mark.parametrize("chunk", [0, 4])
def test_shared_log_probs_and_dpo_gradients_equal_two_rows(tiny_model_dir, chunk):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    policy = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    results = {}
    for share in (True, False):
        policy.zero_grad()
        batch = PairObjective(PreferenceConfig(share_prompt=share), pad_token_id=0).collate(ROWS)
        logps, lengths = forward_logps(policy, batch, contextlib.nullcontext, chunk)
        n = len(ROWS)
        ref = logps.detach() - 0.3  # any fixed reference
        dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1).losses.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        results[share] = logps.detach(), lengths, grads
    assert torch.allclose(results[True][0], results[False][0], atol=1e-4)
    assert torch.equal(results[True][1], results[False][1])
    assert torch.allclose(results[True][2], results[False][2], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- GRPO groups

PAD, EOS, G = 0, 2, 3
# Two groups of 3: prompts of different lengths (the plain batch left-pads one), completions of unequal lengths,
# some ending at EOS, some truncated (no EOS), one of a single token.
PROMPTS = [[5, 6, 7, 8, 9], [11, 12]]
COMPLETIONS = [[20, 21, EOS], [22], [23, 24, 25, 26], [27, 28, 29, 30], [31, EOS], [32, 33]]


def test_collate_groups_puts_each_prompt_once_and_gathers_each_completions_positions():
    from aift.training.grpo_rollout import collate_rollout

    groups = [COMPLETIONS[:G], COMPLETIONS[G:]]
    shared = collate_rollout([p for p in PROMPTS for _ in range(G)], COMPLETIONS, PAD, [EOS], group_size=G)["shared"]
    assert shared["input_ids"][0].tolist() == PROMPTS[0] + sum(groups[0], [])  # the longest row: no padding
    assert shared["input_ids"][1].tolist() == PROMPTS[1] + sum(groups[1], []) + [PAD] * 3
    assert shared["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 5, 6, 7, 8]
    assert shared["segment_ids"][1].tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 3, 3, -1, -1, -1]
    width = shared["input_ids"].shape[1]
    # completion 1 of group 0 ([22]) is predicted by the prompt's last token; then repeated past its end
    assert shared["gather_index"][1].tolist() == [4, 4, 4, 4]
    assert shared["gather_index"][3].tolist() == [width + i for i in (1, 2, 3, 4)]  # [27, 28, 29, 30]
    mask = segment_mask(shared["segment_ids"])[1, 0]
    assert mask[6:8, :2].all() and not mask[6:8, 2:6].any()  # completion 2 sees the prompt, not completion 1
    assert mask[10:, :].sum() == 3 and mask[10:, 10:].diagonal().all()  # padding sees only itself


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_shared_groups_equal_one_row_per_completion(tiny_model_dir, loss_type, mask_truncated):
    """Per-token log-probs and entropies, the GRPO loss (clipped, beta > 0) and the LoRA gradients: fp32, 1e-5."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from aift.training.grpo_loss import grpo_loss
    from aift.training.grpo_rollout import can_share_prompt, collate_rollout, rollout_logps

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    policy = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    assert can_share_prompt(policy)
    prompts = [p for p in PROMPTS for _ in range(G)]
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.8, -1.2, 0.4])
    results = {}
    for group_size in (G, None):
        policy.zero_grad()
        batch = collate_rollout(prompts, COMPLETIONS, PAD, [EOS], mask_truncated, group_size=group_size)
        assert ("shared" in batch) == (group_size is not None)
        logps, entropy = rollout_logps(policy, batch, temperature=0.7, with_entropy=True)
        mask = batch["completion_mask"]
        shift = torch.linspace(-0.3, 0.3, logps.numel()).reshape(logps.shape)  # ratios off 1: some clipped
        out = grpo_loss(logps, mask, advantages, old_logps=logps.detach() + shift, ref_logps=logps.detach() - shift,
                        entropies=entropy, loss_type=loss_type, beta=0.05, max_completion_length=4)  # fmt: skip
        (out.loss_sum / out.count).backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        results[group_size] = logps.detach() * mask, entropy * mask, out.loss_sum.detach(), grads
    for shared, plain in zip(results[G], results[None], strict=True):
        assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    assert results[G][3].abs().sum() > 0
