"""Optimizers and schedules (#26.5): each optimizer trains and resumes exactly, each schedule follows its formula,
warmup is a ratio of the run unless given in steps, NEFTune noises training forwards only."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from optional_pieces import import_optional

from aift import FullFinetuningTrainer
from aift.config import LR_SCHEDULERS, OPTIMIZERS, ConfigError, TrainingConfig
from aift.errors import NotAvailableError
from aift.training import optimizers
from aift.training.backends import AccelerateBackend
from aift.training.batching import Examples
from aift.training.loop import Run, run_training
from aift.training.objectives.sft import SFTObjective
from aift.training.run_files import RunInfo

TEXTS = [f"質問: {i} たす {i} は?\n回答: {2 * i} です。" + "ね" * (i % 5) for i in range(8)]

# ---------------------------------------------------------------------- schedules


def _expected(name: str, done: int, warmup: int, total: int, min_ratio: float = 0.1, decay_ratio: float = 0.2):
    """Each schedule's formula, written out independently of aift.training.optimizers."""
    if done < warmup:
        return done / warmup
    p = (done - warmup) / (total - warmup)
    cosine = (1 + math.cos(math.pi * p)) / 2
    decay_start = total - round(decay_ratio * total)
    return {
        "linear": 1 - p,
        "cosine": cosine,
        "cosine_with_min_lr": min_ratio + (1 - min_ratio) * cosine,
        "constant_with_warmup": 1.0,
        "wsd": 1.0 if done < decay_start else 1 - math.sqrt((done - decay_start) / (total - decay_start)),
    }[name]


def _lr_curve(config: TrainingConfig, total: int) -> list[float]:
    """The learning rate each of ``total`` optimizer steps uses, as the loop reads it (get_last_lr)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=config.learning_rate)
    scheduler = optimizers.make_schedule(optimizer, config, total)
    seen = []
    for _ in range(total):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_each_schedule_follows_its_formula(name):
    config = TrainingConfig(lr_scheduler=name, learning_rate=2.0, warmup_steps=4)
    curve = _lr_curve(config, 20)
    assert curve == pytest.approx([2.0 * _expected(name, s, 4, 20) for s in range(20)])
    assert curve[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])  # every schedule warms up linearly from 0
    assert max(curve) == pytest.approx(2.0)
    final = optimizers.lr_factor(config, 4, 20, 20)
    assert final == pytest.approx({"cosine_with_min_lr": 0.1, "constant_with_warmup": 1.0}.get(name, 0.0))


def test_wsd_is_flat_until_its_decay_fraction_then_decays_to_zero():
    config = TrainingConfig(lr_scheduler="wsd", warmup_steps=2, wsd_decay_ratio=0.25)
    factors = [optimizers.lr_factor(config, 2, 20, s) for s in range(21)]
    assert factors[2:15] == [1.0] * 13  # stable from the end of warmup to step 15 = 20 - 0.25 x 20
    assert all(a > b for a, b in zip(factors[15:], factors[16:], strict=False))
    assert factors[20] == 0.0 and factors[16] == pytest.approx(1 - math.sqrt(1 / 5))


def test_cosine_with_min_lr_ends_at_its_ratio():
    config = TrainingConfig(lr_scheduler="cosine_with_min_lr", min_lr_ratio=0.25, warmup_steps=0)
    assert optimizers.lr_factor(config, 0, 10, 10) == pytest.approx(0.25)
    assert optimizers.lr_factor(config, 0, 10, 5) == pytest.approx(0.25 + 0.75 * 0.5)


def test_warmup_is_a_ratio_of_the_run_unless_given_in_steps():
    assert optimizers.warmup_steps(TrainingConfig(), 40) == 2  # 3% of 40 = 1.2, rounded up
    assert optimizers.warmup_steps(TrainingConfig(), 1000) == 30
    assert optimizers.warmup_steps(TrainingConfig(warmup_ratio=0.1), 40) == 4
    assert optimizers.warmup_steps(TrainingConfig(warmup_ratio=0.1, warmup_steps=7), 40) == 7  # steps win
    assert optimizers.warmup_steps(TrainingConfig(warmup_steps=0), 40) == 0
    # A 40-step run reaches its peak rate (with the old fixed 100 warmup steps it never did).
    assert max(_lr_curve(TrainingConfig(learning_rate=1.0), 40)) == pytest.approx(1.0)


def _set_up_run(config: TrainingConfig, tiny_model_dir) -> Run:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    examples = Examples(rows=[{"input_ids": x, "labels": x} for x in ids], name="training")
    info = RunInfo(method="full", model_name=str(tiny_model_dir))
    run = Run(tokenizer, config, info, AccelerateBackend(config, is_peft=False), SFTObjective(), examples, None)
    run.setup(model)
    return run


def test_warmup_covering_the_whole_run_is_warned(fp32_config, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="aift.training.loop"):
        run = _set_up_run(fp32_config(warmup_steps=None, warmup_ratio=1.0, max_steps=3), tiny_model_dir)
    assert run.total_steps == 3
    assert "warmup_steps=3 (warmup_ratio=1.0) >= total steps 3: warmup covers the whole run" in caplog.text
    assert isinstance(run.backend.optimizer.optimizer, torch.optim.AdamW)  # the default optimizer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aift.training.loop"):
        _set_up_run(fp32_config(warmup_steps=None, max_steps=3, output_dir=str(run.output_dir) + "-2"), tiny_model_dir)
    assert "warmup covers" not in caplog.text  # 3% of 3 steps: 1 step


# ---------------------------------------------------------------------- optimizers


def test_unknown_names_list_the_choices():
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, adamw_8bit, .*sgd; got 'adam'"):
        TrainingConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="lr_scheduler must be one of linear, cosine, .*wsd; got 'step'"):
        TrainingConfig(lr_scheduler="step")
    with pytest.raises(ConfigError, match="warmup_ratio must be in"):
        TrainingConfig(warmup_ratio=1.5)


def test_schedule_free_takes_a_constant_schedule():
    assert TrainingConfig(optimizer="schedule_free_adamw").lr_scheduler == "constant_with_warmup"
    with pytest.raises(ConfigError, match="schedule_free_adamw replaces the schedule's decay.*not 'cosine'"):
        TrainingConfig(optimizer="schedule_free_adamw", lr_scheduler="cosine")


def test_a_missing_optimizer_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(optimizers.NEEDS, "schedule_free_adamw", ("aift_no_such_module", "pip install 'aift[x]'"))
    with pytest.raises(NotAvailableError, match=r"schedule_free_adamw needs the aift_no_such_module package: pip"):
        optimizers.check_available(TrainingConfig(optimizer="schedule_free_adamw"))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = optimizers.make_optimizer(model, TrainingConfig(optimizer="muon", weight_decay=0.1), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert "model.embed_tokens.weight" in adamw and "model.norm.weight" in adamw  # lm_head is tied to it
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.1.mlp.down_proj.weight" in muon
    assert all(".layers." in n and "norm" not in n for n in muon)
    assert muon | adamw == set(names.values()) and not muon & adamw
    # One param_groups list: the schedule sets every group's learning rate, Muon's included.
    assert optimizer.param_groups == optimizer.muon.param_groups + optimizer.adamw.param_groups
    decay = {g["weight_decay"] for g in optimizer.adamw.param_groups if any(p.ndim == 1 for p in g["params"])}
    assert decay == {0.0}


LEARNING_RATES = {"sgd": 0.1}  # SGD moves far less per step than the adaptive optimizers at their rates


def _losses(output_dir) -> list[float]:
    import json

    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_exactly(optimizer, fp32_config, tmp_path):
    """2 steps of the tiny full model, a checkpoint after each; step 2 resumed from checkpoint-1 has the
    uninterrupted run's loss (optimizer state, schedule and RNG restored)."""
    if optimizer in optimizers.NEEDS:
        module, install = optimizers.NEEDS[optimizer]
        import_optional(module, f"optimizer {optimizer} needs {module} ({install})")
    extra = {"neftune_noise_alpha": 5.0} if optimizer == "adamw" else {}  # NEFTune's noise resumes exactly too
    config = fp32_config(
        optimizer=optimizer, learning_rate=LEARNING_RATES.get(optimizer, 1e-3), max_steps=2, save_steps=1,
        save_total_limit=None, weight_decay=0.01, output_dir=str(tmp_path / "run"), **extra,
    )  # fmt: skip
    FullFinetuningTrainer(config.model_name, config).train(train_texts=TEXTS)
    straight = _losses(tmp_path / "run")
    assert len(straight) == 2 and straight[1] < straight[0], straight  # it learns
    resume = dict(config.__dict__, resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "checkpoint-1"))
    FullFinetuningTrainer(config.model_name, TrainingConfig(**resume)).train(train_texts=TEXTS)
    assert _losses(tmp_path / "run") == straight  # step 2 again, from the checkpoint: the same loss, exactly


def test_schedule_free_evaluates_and_saves_its_averaged_weights(fp32_config, tiny_model_dir):
    import_optional(
        "schedulefree", "optimizer schedule_free_adamw needs schedulefree (pip install 'aift[schedulefree]')"
    )
    from safetensors.torch import load_file

    from aift.training.step import pad_plan

    run = _set_up_run(fp32_config(optimizer="schedule_free_adamw"), tiny_model_dir)
    plan, real = pad_plan(run.planner.epoch(0), 1)
    for _ in range(2):
        run.train_step(plan, real)
    weight = run.backend.model.get_parameter("model.layers.0.mlp.up_proj.weight")
    training_point = weight.detach().clone()
    with optimizers.averaged_weights(run.backend.optimizer, run.config):
        averaged = weight.detach().clone()
    gap = (averaged - training_point).abs().max().item()
    assert gap > 1e-5  # x (the average) is not y (where gradients are taken)
    rounding = {"rtol": 0, "atol": gap / 100}  # y -> x -> y is exact but for rounding
    torch.testing.assert_close(weight.detach(), training_point, **rounding)  # back to y for the next step
    run.save()
    saved = load_file(run.checkpoints_dir / "checkpoint-2" / "model.safetensors")
    torch.testing.assert_close(saved["model.layers.0.mlp.up_proj.weight"], averaged, **rounding)
    torch.testing.assert_close(weight.detach(), training_point, **rounding)


# ---------------------------------------------------------------------- NEFTune


def test_neftune_noises_the_input_embeddings_in_training_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    embeddings = model.get_input_embeddings()
    ids = torch.arange(10).reshape(1, 10)
    clean = embeddings(ids)
    with optimizers.neftune(model, alpha=5.0):
        model.train()
        noisy = embeddings(ids)
        model.eval()
        assert torch.equal(embeddings(ids), clean)  # eval forwards are never noised
    bound = 5.0 / math.sqrt(10 * clean.size(-1))
    assert 0 < (noisy - clean).abs().max() <= bound
    model.train()
    assert torch.equal(embeddings(ids), clean)  # the hook is gone with the context


def test_neftune_is_for_supervised_fine_tuning_only(fp32_config):
    preference = SimpleNamespace(name="dpo", check=lambda examples: None)
    with pytest.raises(ConfigError, match="neftune_noise_alpha is for supervised fine-tuning, not dpo"):
        run_training(None, None, fp32_config(neftune_noise_alpha=5.0), None, None, None, objective=preference)
