"""The one loop's train step without a whole run: a Run set up on the Accelerate backend (fp32, CPU, tiny
model) takes single optimizer steps, and each is checked against the maths done by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from aift.training.backends import AccelerateBackend
from aift.training.batching import Examples
from aift.training.loop import Run
from aift.training.loss import shifted_cross_entropy_sum
from aift.training.objectives.sft import SFTObjective
from aift.training.run_files import RunInfo

TEXTS = [f"質問: {i} たす {i} は?\n回答: {2 * i} です。" + "ね" * (i % 5) for i in range(8)]


@pytest.fixture
def make_run(fp32_config, tiny_model_dir):
    """make_run(**config overrides): a Run of the tiny full model on TEXTS, set up (output dir, optimizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def make(**overrides) -> Run:
        config = fp32_config(**overrides)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        ids = [tokenizer(text)["input_ids"] for text in TEXTS]
        examples = Examples(rows=[{"input_ids": x, "labels": x} for x in ids], name="training")
        info = RunInfo(method="full", model_name=str(tiny_model_dir))
        backend = AccelerateBackend(config, is_peft=False)
        run = Run(tokenizer, config, info, backend, SFTObjective(), examples, None)
        run.setup(model)
        return run

    return make


def _token_mean_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        sums = [
            shifted_cross_entropy_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"])
            for b in batches
        ]  # fmt: skip
    return (sum(sums) / sum(int(b["num_trained_tokens"]) for b in batches)).item()


def test_a_train_step_steps_once_on_the_token_mean_of_its_micro_batches(make_run):
    run = make_run(batch_size=2, gradient_accumulation_steps=2, packing=False)
    before = copy.deepcopy(run.backend.model)
    plan = run.planner.epoch(0)
    batches = [run.planner.collate(plan[j]) for j in (0, 1)]

    outcome = run.train_step(plan, len(plan))

    assert outcome is not None
    assert outcome.loss == pytest.approx(_token_mean_loss(before, batches), rel=1e-5)
    assert outcome.tokens == sum(int(b["num_tokens"]) for b in batches)
    assert outcome.lr == pytest.approx(1e-3)  # no warmup: the peak rate from the first step
    assert (run.state.step, run.state.micro_batch, run.state.tokens) == (1, 2, outcome.tokens)
    assert run.state.last_loss == outcome.loss
    after = dict(run.backend.model.named_parameters())
    assert any(not torch.equal(p, after[name]) for name, p in before.named_parameters())  # it stepped
    assert all(p.grad is None for p in run.backend.model.parameters())  # and cleared the gradients


def test_the_next_step_takes_the_next_micro_batches(make_run):
    run = make_run(batch_size=2, gradient_accumulation_steps=2, packing=False)
    plan = run.planner.epoch(0)
    run.train_step(plan, len(plan))
    model = copy.deepcopy(run.backend.model)
    expected = _token_mean_loss(model, [run.planner.collate(plan[j]) for j in (2, 3)])

    outcome = run.train_step(plan, len(plan))

    assert outcome is not None and outcome.loss == pytest.approx(expected, rel=1e-5)
    assert (run.state.step, run.state.micro_batch) == (2, 4)


def test_a_non_finite_step_is_skipped_without_counting_it(make_run):
    run = make_run(batch_size=2, gradient_accumulation_steps=2, packing=False, skip_nonfinite_steps=1)
    model = run.backend.model
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit row holds a NaN: the loss is NaN
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = run.planner.epoch(0)

    assert run.train_step(plan, len(plan)) is None

    assert (run.state.step, run.state.micro_batch, run.state.skipped_nonfinite_steps) == (0, 2, 1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=0, equal_nan=True, msg=name)  # no step
        assert p.grad is None
