"""The trainers' API on the tiny model: clear errors, output layout, LoRA variants, adapters round trip."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from aift import FullFinetuningTrainer, LoRAConfig, LoRAFinetuningTrainer, TextDataset
from aift.config import ConfigError, TrainingConfig
from aift.data import DatasetError
from aift.errors import NotAvailableError
from aift.training.run_files import OutputDirError

TEXTS = [f"質問: {i}月の次は?\n回答: {i + 1}月です。" for i in range(1, 7)]
TRAIN_KEYS = {
    "type", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "tokens", "peak_mem_gb", "time",
    "skipped_nonfinite_steps",
}  # fmt: skip
SUMMARY_KEYS = {
    "completed", "model", "method", "steps", "epochs", "tokens", "train_tokens_per_s", "final_train_loss",
    "final_eval_loss", "initial_eval_loss", "peak_mem_gb", "wall_time_s", "output_dir", "prompt_format",
    "skipped_nonfinite_steps",
}  # fmt: skip


def _lora(config, **lora):
    return LoRAFinetuningTrainer(config.model_name, LoRAConfig(lora_dropout=0.0, **lora), config)


def test_clear_errors_before_training(fp32_config, tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        FullFinetuningTrainer(fp32_config().model_name, fp32_config()).train(train_texts=[])
    no_answers = TextDataset(["質問だけ"] * 3, tokenizer, response_template="回答:")
    with pytest.raises(DatasetError, match="no trained tokens"):
        FullFinetuningTrainer(fp32_config().model_name, fp32_config(), train_dataset=no_answers).train()
    for field in ("batch_size", "gradient_accumulation_steps"):
        with pytest.raises(ConfigError, match=field):
            TrainingConfig(**{field: 0})
    with pytest.raises(DatasetError, match="no training data"):
        FullFinetuningTrainer(fp32_config().model_name, fp32_config()).train()


def test_output_dir_of_another_run_is_refused_unless_overwritten(fp32_config):
    config = fp32_config(max_steps=1)
    _lora(config).train(train_texts=TEXTS)
    with pytest.raises(OutputDirError, match="holds another run"):
        _lora(fp32_config(max_steps=1)).train(train_texts=TEXTS)
    _lora(fp32_config(max_steps=1, overwrite_output_dir=True)).train(train_texts=TEXTS)


def test_output_layout_summary_and_metrics_schema(fp32_config, read_metrics, tmp_path):
    config = fp32_config(max_steps=4, save_steps=1, save_total_limit=2, eval_steps=2)
    trainer = _lora(config, use_rslora=True)
    trainer.train(train_texts=TEXTS, eval_texts=TEXTS[:2])
    out = trainer.result.output_dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]
    ckpt = out / "checkpoints" / "checkpoint-4"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (
        state["step"] == 4 and state["epoch"] == 2 and state["micro_batch"] == 0
    )  # 3 packed rows: 2 micro-batches an epoch
    for record in read_metrics(out):
        assert set(record) == TRAIN_KEYS
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4] and set(evals[0]) == {
        "type",
        "step",
        "eval_loss",
        "eval_ppl",
        "time",
    }
    summary = json.loads((out / "train_summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["completed"] and summary["method"] == "lora"
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    meta = json.loads((out / "final" / "aift_meta.json").read_text())
    assert set(meta) == {"base_model", "method", "prompt_format", "max_length", "aift_version"}
    assert json.loads((out / "final" / "adapter_config.json").read_text())["use_rslora"] is True
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["TrainingConfig"]["max_steps"] == 4 and resolved["LoRAConfig"]["use_rslora"] is True


def test_adapter_reloads_and_merges_to_the_same_logits(fp32_config, tiny_model_dir):
    config = fp32_config(max_steps=2, learning_rate=1e-2)
    trainer = LoRAFinetuningTrainer(str(tiny_model_dir), LoRAConfig(lora_dropout=0.0, use_dora=True), config)
    merged = trainer.train(train_texts=TEXTS, merge=True)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    reloaded, _ = LoRAFinetuningTrainer.load_lora_model(str(tiny_model_dir), trainer.result.output_dir / "final")
    base = FullFinetuningTrainer(str(tiny_model_dir), config).model.load_model()
    with torch.no_grad():
        adapted, plain, merged_logits = reloaded(ids).logits, base(ids).logits, merged.eval()(ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(merged_logits, adapted, atol=1e-4, rtol=1e-4)
    assert (trainer.result.output_dir / "merged" / "model.safetensors").is_file()


def test_frozen_base_in_bf16_with_fp32_adapters(fp32_config, native_cpu_bf16):
    trainer = _lora(fp32_config(max_steps=2, bf16=True, frozen_base_bf16=True))
    model = trainer.train(train_texts=TEXTS)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    with pytest.raises(Exception, match="frozen_base_bf16 needs mixed precision"):
        _lora(fp32_config(frozen_base_bf16=True, output_dir=str(trainer.result.output_dir) + "2")).train(
            train_texts=TEXTS
        )


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_logger_package_is_named(fp32_config):
    with pytest.raises(NotAvailableError, match="wandb"):
        _lora(fp32_config(report_to=["wandb"])).train(train_texts=TEXTS)


@pytest.mark.parametrize("frozen_base_bf16", [False, True])
def test_lora_with_gradient_checkpointing_under_bf16_autocast(fp32_config, frozen_base_bf16, native_cpu_bf16):
    """The defaults (gradient checkpointing on, mixed precision) with LoRA: recompute must match the forward,
    and the result must equal the run without checkpointing (checkpointing changes memory, not math)."""
    losses = []
    for gc in (True, False):
        config = fp32_config(
            max_steps=2,
            bf16=True,
            gradient_checkpointing=gc,
            frozen_base_bf16=frozen_base_bf16,
            output_dir=str(fp32_config().output_dir) + f"-gc{gc}",
        )
        # lora_dropout > 0 as by default: peft then casts the adapter input, the cast the bug hinged on
        torch.manual_seed(0)
        trainer = LoRAFinetuningTrainer(config.model_name, LoRAConfig(lora_dropout=0.1), config)
        trainer.train(train_texts=TEXTS)
        lines = (trainer.result.output_dir / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in lines if json.loads(line)["type"] == "train"])
    assert len(losses[0]) == 2
    assert losses[0] == pytest.approx(losses[1], abs=2e-2)  # bf16 autocast: same math, rounding may differ


def test_use_accelerate_is_still_accepted_but_ignored_with_a_warning(tiny_model_dir):
    with pytest.warns(DeprecationWarning, match="use_accelerate"):
        FullFinetuningTrainer(str(tiny_model_dir), use_accelerate=True)
