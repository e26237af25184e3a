"""A pair's prompt run once (prompt + chosen + rejected in one row) gives the log-probs of the two sequences."""

from __future__ import annotations

import contextlib

import pytest
import torch

from aift.training.objectives.logps import forward_logps
from aift.training.objectives.pairs import PairObjective, PreferenceConfig, dpo_loss
from aift.training.prompt_sharing import collate_shared, shared_prefix_length

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
