"""strategy="pipeline": 2 stages in 2 real processes over gloo train exactly what one process trains.

One torchrun launch (tests/distributed/pipeline_training_worker.py) trains the tiny llama with LoRA (1F1B,
gradient checkpointing) and then fully (GPipe; tied embeddings, clipping active): 5 optimizer steps of
4 packed rows as 2 micro-batches of 2, crossing an epoch end (a step with one empty micro-batch); then each
run again from its step-2 checkpoint. The reference is the one-process Accelerate loop with batch 4, run in
the test process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import clean_env, run_with_timeout, train_losses

from aift.config import LoRAConfig, MultiGPUTrainingConfig, TrainingConfig
from aift.data.packing import IGNORE_INDEX
from aift.distributed.launch import find_free_port
from aift.distributed.pipeline_backend import (
    FixedShapeBatches,
    _concat,
    _Ranks,
    check_pipeline_config,
    load_stage_checkpoint,
    token_loss,
)
from aift.errors import AiftError, NotAvailableError
from aift.training.batching import Examples
from aift.training.checkpoint import CheckpointError

TOLERANCE = 1e-4
WORKER = Path(__file__).with_name("pipeline_training_worker.py")


def _reference_config(out: Path, data: Path, **overrides) -> TrainingConfig:
    """The worker's settings in one process: batch 4, no accumulation."""
    return TrainingConfig(
        dataset_path=str(data),
        output_dir=str(out),
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=5,
        learning_rate=1e-3,
        warmup_steps=1,
        max_length=64,
        logging_steps=1,
        eval_steps=2,
        save_steps=0,
        report_to=["none"],
        seed=7,
        bf16=False,
        fp16=False,
        packing=True,
        **overrides,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_prepared) -> dict[str, tuple[Path, Path]]:
    """name -> (pipeline output dir, one-process output dir), for lora and full (NAME-resumed beside the first)."""
    from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer

    root = tmp_path_factory.mktemp("pipeline-training")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={find_free_port()}",
        str(WORKER),
        str(tiny_model_dir),
        str(tiny_prepared),
        str(root / "pipe"),
    ]
    result = run_with_timeout(command, clean_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    ref = root / "one"
    LoRAFinetuningTrainer(
        str(tiny_model_dir), lora, _reference_config(ref / "lora", tiny_prepared, gradient_checkpointing=True)
    ).train()
    FullFinetuningTrainer(
        str(tiny_model_dir), _reference_config(ref / "full", tiny_prepared, gradient_checkpointing=False)
    ).train()
    return {name: (root / "pipe" / name, ref / name) for name in ("lora", "full")}


def _records(out: Path, kind: str, key: str) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if r["type"] == kind}


def _final_logits(final: Path, base: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if (final / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "full"])
def test_pipeline_equals_one_process_step_by_step(runs, name, tiny_model_dir):
    pipe, one = runs[name]
    losses, expected = train_losses(pipe), train_losses(one)  # train_losses also fails on a second writer
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4, 5]
    for step in expected:
        assert abs(losses[step] - expected[step]) < TOLERANCE, f"step {step}: {losses[step]} vs {expected[step]}"
    for kind, key in (("train", "grad_norm"), ("eval", "eval_loss")):
        got, want = _records(pipe, kind, key), _records(one, kind, key)
        assert sorted(got) == sorted(want) and len(want) >= 3
        assert all(abs(got[s] - want[s]) < TOLERANCE for s in want), (key, got, want)
    if name == "full":
        assert _records(one, "train", "grad_norm")[1] > 1.0  # clipping (max_grad_norm 1) was part of the check
    assert losses[5] < losses[1]  # it learns

    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    got = _final_logits(pipe / "final", tiny_model_dir, ids)
    want = _final_logits(one / "final", tiny_model_dir, ids)
    assert (got - want).abs().max().item() < TOLERANCE
    before = _final_logits(tiny_model_dir, tiny_model_dir, ids)
    assert (got - before).abs().max().item() > 100 * TOLERANCE  # the saved weights are the trained ones


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "full"])
def test_pipeline_checkpoint_resumes_exactly(runs, name):
    pipe, _ = runs[name]
    resumed, uninterrupted = train_losses(pipe.with_name(f"{name}-resumed")), train_losses(pipe)
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # steps 1-2 kept from the interrupted run's metrics
    for step in (3, 4, 5):
        assert abs(resumed[step] - uninterrupted[step]) < 1e-6, f"step {step}: {resumed[step]} vs {uninterrupted[step]}"
    checkpoint = pipe / "checkpoints" / "checkpoint-2"
    assert {"optimizer-stage0.pt", "optimizer-stage1.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }


@pytest.mark.slow
def test_pipeline_run_dir_has_the_main_loops_layout(runs):
    for name, (pipe, one) in runs.items():
        assert sorted(p.name for p in (pipe / "checkpoints").iterdir()) == [
            "checkpoint-2",
            "checkpoint-4",
            "checkpoint-5",
        ]
        assert sorted(p.name for p in (pipe / "final").iterdir()) == sorted(p.name for p in (one / "final").iterdir())
        summary = json.loads((pipe / "train_summary.json").read_text())
        assert summary["completed"] is True and summary["steps"] == 5 and summary["method"] == name
        meta = json.loads((pipe / "final" / "aift_meta.json").read_text())
        assert meta["prompt_format"] == "chatml"
        assert (pipe / "config.yaml").is_file()
        assert not list(pipe.rglob(".tmp*")), "a temp file or folder was left behind"


# ---------------------------------------------------------------------- fast checks (one process)


def test_token_loss_of_micro_batches_adds_up_to_the_token_mean_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[0, :4] = IGNORE_INDEX  # micro-batches with different numbers of trained tokens
    labels[3] = IGNORE_INDEX
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    parts = token_loss(logits[:2], labels[:2], trained) + token_loss(logits[2:], labels[2:], trained)
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(parts, whole)


def test_fixed_shape_batches_fill_missing_rows_with_nothing_to_train():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    examples = Examples(rows=rows, name="training")
    packed = FixedShapeBatches(examples, rows=4, max_length=16, packing=True, pad_token_id=0).train([[[0, 1]]])
    assert packed["input_ids"].shape == (4, 16) and packed["attention_mask"].shape == (4, 1, 16, 16)
    assert int(packed["num_trained_tokens"]) == 3  # 2 of the first example, 1 of the second; empty rows none
    padded = FixedShapeBatches(examples, rows=4, max_length=16, packing=False, pad_token_id=0).train([[1], [0]])
    assert padded["input_ids"].shape == (4, 16) and (padded["labels"][2:] == IGNORE_INDEX).all()
    assert padded["input_ids"][1, :3].tolist() == [5, 6, 7]  # the plan's order is kept


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_fixed_shape_micro_batches_make_the_batch_of_the_whole_step(packing):
    """The pipeline backend collates each micro-batch alone and concatenates them for the schedule (only an
    epoch's last micro-batch is short)."""
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100, *range(4, 3 + n)]} for n in (5, 3, 7, 2)]
    examples = Examples(rows=rows, name="training")
    window = [[[0, 1], [2]], [[3]]] if packing else [[0, 1], [2]]
    whole = FixedShapeBatches(examples, rows=4, max_length=16, packing=packing, pad_token_id=0).train(window)
    per_micro_batch = FixedShapeBatches(examples, rows=2, max_length=16, packing=packing, pad_token_id=0)
    joined = _concat([per_micro_batch.train([micro_batch]) for micro_batch in window])
    assert joined.keys() == {k for k in whole if k not in ("num_tokens", "num_trained_tokens")}
    for key, value in joined.items():
        assert torch.equal(value, whole[key]), key


def _pipeline_config(**overrides) -> MultiGPUTrainingConfig:
    return MultiGPUTrainingConfig(strategy="pipeline", pipeline_parallel_size=2, **overrides)


def test_pipeline_config_errors_say_what_to_change():
    with pytest.raises(AiftError, match="pipeline_parallel_size=2 but 4 process"):
        check_pipeline_config(_pipeline_config(), 4)
    with pytest.raises(AiftError, match="gradient_accumulation_steps=1 < pipeline_parallel_size=2"):
        check_pipeline_config(_pipeline_config(gradient_accumulation_steps=1), 2)
    check_pipeline_config(_pipeline_config(gradient_accumulation_steps=1, pipeline_schedule="gpipe"), 2)
    with pytest.raises(AiftError, match="pipeline_schedule must be one of"):
        check_pipeline_config(_pipeline_config(pipeline_schedule="zb"), 2)


def test_a_one_process_checkpoint_does_not_resume_a_pipeline(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot resume a pipeline of 2 stages .no optimizer-stageR.pt"):
        load_stage_checkpoint(tmp_path, None, None, None, _Ranks(0, 2, torch.device("cpu")), is_peft=False)


def test_pipeline_outside_a_launcher_is_refused_before_anything_is_written(monkeypatch, tiny_model_dir, tmp_path):
    from aift.distributed.trainer import AdvancedMultiGPUTrainer

    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    trainer = AdvancedMultiGPUTrainer(str(tiny_model_dir), _pipeline_config(output_dir=str(tmp_path), max_steps=1))
    with pytest.raises(AiftError, match="one process per stage under a launcher"):
        trainer.train(train_texts=["こんにちは"])
    assert not any(tmp_path.iterdir())


def test_qlora_under_pipeline_says_it_is_not_supported(monkeypatch, tiny_model_dir, tmp_path):
    from aift.distributed.trainer import AdvancedMultiGPUTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = _pipeline_config(output_dir=str(tmp_path), world_size=2)
    trainer = AdvancedMultiGPUTrainer(str(tiny_model_dir), config, lora_config=LoRAConfig(use_qlora=True))
    with pytest.raises(NotAvailableError, match="QLoRA with strategy pipeline"):
        trainer.train(train_texts=["a"])
