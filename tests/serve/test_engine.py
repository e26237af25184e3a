"""The batching engine on the embedded model: batched greedy equals one at a time (left padding, mask and positions
right), seeded sampling repeats whatever it is batched with, requests joining a running batch answer as alone,
stops, cancellation, the bounded queue, the context."""

from __future__ import annotations

import pytest
import torch

from aift.inference.runner import build_prompt
from aift.serve.engine import (
    ContextLengthError,
    Engine,
    QueueFullError,
    Sampling,
    UnknownModelError,
)
from aift.serve.models import load_served_models

# Different lengths, so a batch of them is padded.
PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow, one per line, and say which one you like best and why.",
    "Hi",
]
GREEDY = Sampling(max_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def served(embedded_dir):
    return load_served_models(str(embedded_dir), name="smol", device="cpu")


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _run(served, prompts, sampling, max_batch=8):
    """Answers with all requests queued before the worker starts, so it takes them in batches of max_batch."""
    engine = Engine(served, max_batch=max_batch)
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    handles = [engine.submit_chat("smol", _chat(p), s) for p, s in zip(prompts, samplings, strict=True)]
    engine.start()
    try:
        return [h.result() for h in handles], engine.stats
    finally:
        engine.close()


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time_and_generate(served):
    alone, alone_stats = _run(served, PROMPTS, GREEDY, max_batch=1)
    batched, batched_stats = _run(served, PROMPTS, GREEDY, max_batch=3)
    assert alone_stats.largest_batch == 1 and batched_stats.largest_batch == 3
    assert [(e.answer, e.completion_tokens) for e in batched] == [(e.answer, e.completion_tokens) for e in alone]
    assert all(e.answer for e in alone) and "Paris" in alone[0].answer
    # the hand-written decode loop makes what transformers' generate makes
    loaded = served[0].loaded
    ids = loaded.tokenizer(build_prompt(loaded, _chat(PROMPTS[1])), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=10, do_sample=False)
    expected = loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=False)
    assert alone[1].answer == loaded.prompt_format.parse_answer(expected, loaded.tokenizer)
    assert alone[1].prompt_tokens == ids["input_ids"].shape[1]


def test_seeded_sampling_repeats_alone_or_in_a_batch(served):
    seeded = [Sampling(max_tokens=8, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 1)]
    same_prompt = [PROMPTS[1]] * 3
    (first, second, again), stats = _run(served, same_prompt, seeded)
    (alone,), _ = _run(served, [PROMPTS[1]], seeded[0])
    assert stats.largest_batch == 3
    assert first.answer == again.answer == alone.answer
    assert first.answer != second.answer  # a different seed draws differently


def test_text_completion_stops_at_a_stop_string_and_at_max_tokens(served):
    engine = Engine(served).start()
    try:
        stopped = engine.submit_text(
            "smol", "1, 2, 3, 4,", Sampling(max_tokens=20, temperature=0, stop=(" 7",))
        ).result()
        capped = engine.submit_text("smol", "1, 2, 3, 4,", Sampling(max_tokens=3, temperature=0)).result()
    finally:
        engine.close()
    assert stopped.finish_reason == "stop" and stopped.answer == " 5, 6,"
    assert capped.finish_reason == "length" and capped.completion_tokens == 3
    assert stopped.answer.startswith(capped.answer)


def test_cancel_stops_the_generation(served):
    engine = Engine(served).start()
    try:
        handle = engine.submit_chat("smol", _chat("Write a long story about a cat."), Sampling(max_tokens=200))
        events = []
        for event in handle:
            events.append(event)
            handle.cancel()  # after the first piece
        assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 10
        assert engine.stats.cancelled == 1 and engine.pending == 0
    finally:
        engine.close()


def test_queue_is_bounded_and_requests_are_checked(served):
    engine = Engine(served, max_pending=2)  # not started: everything submitted waits
    first = engine.submit_chat("smol", _chat("Hi"), GREEDY)
    engine.submit_chat("smol", _chat("Hello"), GREEDY)
    with pytest.raises(QueueFullError):
        engine.submit_chat("smol", _chat("Hey"), GREEDY)
    with pytest.raises(UnknownModelError, match="'gpt-4'.*smol"):
        engine.submit_chat("gpt-4", _chat("Hi"), GREEDY)
    with pytest.raises(ContextLengthError, match="maximum context length is 8192"):
        engine.submit_text("smol", "word " * 9000, GREEDY)
    with pytest.raises(ContextLengthError, match="max_tokens"):
        engine.submit_chat("smol", _chat("Hi"), Sampling(max_tokens=9000))
    engine.close()
    assert first.result().finish_reason == "cancelled" and engine.pending == 0


CONTINUED = ["The weather today is", "Once upon a time, in a small village by the sea, there lived", "1, 2, 3,", "Hi"]
# A long, B short: B leaves after 3 tokens and C takes its slot while A runs; D takes the next free slot. A and D
# are greedy, B and C sampled with a seed, so each kind joins a running batch.
MAX_TOKENS = [16, 3, 6, 4]


def _answers(served, max_batch: int, batching: str = "continuous"):
    """Every request queued before the worker starts: with max_batch 2, C and D can only join the running batch."""
    engine = Engine(served, max_batch=max_batch, batching=batching)
    samplings = [Sampling(max_tokens=n, temperature=i % 2, seed=i) for i, n in enumerate(MAX_TOKENS)]
    handles = [engine.submit_text("smol", p, s) for p, s in zip(CONTINUED, samplings, strict=True)]
    engine.start()
    try:
        return [(e.answer, e.completion_tokens, e.finish_reason) for e in (h.result() for h in handles)], engine.stats
    finally:
        engine.close()


@pytest.mark.usefixtures("one_thread")
def test_requests_joining_mid_batch_answer_as_alone(served):
    alone, alone_stats = _answers(served, max_batch=1)
    joined, stats = _answers(served, max_batch=2)
    assert [tokens for _, tokens, _ in alone] == MAX_TOKENS  # all run to max_tokens: the schedule is as planned
    assert joined == alone
    assert alone_stats.largest_batch == 1 and stats.largest_batch == 2
    assert stats.joined == 2 and stats.batches == 1  # C and D joined the one running batch
    assert stats.completed == 4 and stats.cancelled == 0
    static, static_stats = _answers(served, max_batch=2, batching="static")  # the old mode, kept to compare
    assert static == alone and static_stats.batches == 2 and static_stats.joined == 0  # A+B, then C+D
