"""The one generation module: greedy equals transformers' generate, seeded sampling, ordering and stops."""

from __future__ import annotations

import pytest
import torch

from aift.errors import AiftError
from aift.inference.generation import SamplingParams, eos_token_ids, generate_batch, left_padded

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write one word about the sea, please, now."]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    assert len({len(i) for i in ids}) == len(ids), "the prompts must have mixed lengths"
    return ids


def _hf_greedy(model, tokenizer, prompts, max_new_tokens, eos):
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(eos),
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = []
    for row in out[:, ids.shape[1] :].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        completions.append(row[: ends[0] + 1] if ends else row)
    return completions


def test_greedy_equals_transformers_generate_batched_left_padded(embedded_model, tokenizer, prompts):
    eos = eos_token_ids(embedded_model, tokenizer)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=eos)
    ours = generate_batch(embedded_model, prompts, params, pad_token_id=tokenizer.pad_token_id)
    assert ours == _hf_greedy(embedded_model, tokenizer, prompts, 12, eos)
    alone = [generate_batch(embedded_model, [p], params, pad_token_id=tokenizer.pad_token_id)[0] for p in prompts]
    assert ours == alone


def test_seeded_sampling_is_reproducible_and_the_seed_matters(embedded_model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return generate_batch(embedded_model, prompts, params, pad_token_id=tokenizer.pad_token_id, generator=generator)

    first = sample(0)
    assert first == sample(0)
    assert first != sample(1)
    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50, seed=0)
    assert generate_batch(embedded_model, prompts, seeded, pad_token_id=tokenizer.pad_token_id) == first


def test_top_k_1_equals_greedy(embedded_model, tokenizer, prompts):
    greedy = generate_batch(embedded_model, prompts, SamplingParams(max_new_tokens=8), pad_token_id=0)
    top1 = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1)
    assert generate_batch(embedded_model, prompts, top1, pad_token_id=0, generator=torch.Generator()) == greedy


def test_num_return_sequences_come_in_prompt_order(embedded_model, tokenizer, prompts):
    greedy = SamplingParams(max_new_tokens=5)
    single = generate_batch(embedded_model, prompts[:2], greedy, pad_token_id=0)
    repeated = generate_batch(embedded_model, prompts[:2], greedy, pad_token_id=0, num_return_sequences=3)
    assert repeated == [single[0]] * 3 + [single[1]] * 3
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    group = generate_batch(embedded_model, prompts[:1], sampled, pad_token_id=0, num_return_sequences=4)
    assert len(group) == 4 and len({tuple(c) for c in group}) > 1, "each copy draws its own sample"


def test_stop_tokens_end_a_sequence_and_are_kept(embedded_model, tokenizer, prompts):
    free = generate_batch(embedded_model, prompts, SamplingParams(max_new_tokens=10), pad_token_id=0)
    assert all(len(c) == 10 for c in free), "without stop ids every sequence runs to max_new_tokens"
    stop = free[0][3]
    stopped = generate_batch(
        embedded_model, prompts, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)), pad_token_id=0
    )
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    for full, cut in zip(free, stopped, strict=True):
        assert cut == (full[: full.index(stop) + 1] if stop in full else full)


def test_on_token_can_end_a_sequence(embedded_model, tokenizer, prompts):
    seen = []

    def on_token(index, token):
        seen.append((index, token))
        return index == 1  # the second sequence ends after its first token

    out = generate_batch(embedded_model, prompts, SamplingParams(max_new_tokens=4), pad_token_id=0, on_token=on_token)
    assert [len(c) for c in out] == [4, 1, 4]
    assert sorted(seen) == sorted((i, t) for i, c in enumerate(out) for t in c)


def test_bad_params_are_refused():
    with pytest.raises(AiftError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(AiftError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
