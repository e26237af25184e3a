"""The memory plan counts each optimizer's state and peft's modules_to_save copies as training really holds them:
the planned bytes equal the bytes of the real optimizer's state after one step, and of the real trainable
parameters, on the 2-layer model."""

from __future__ import annotations

import json

import pytest
import torch
from optional_pieces import import_optional
from transformers import AutoConfig, AutoModelForCausalLM

from aift.cli import main
from aift.config import LoRAConfig, TrainingConfig
from aift.lora.model import add_adapters
from aift.training import optimizers
from aift.training.memory import empty_model, parameter_bytes, trainable_count

SAVED = ["embed_tokens", "lm_head"]


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state, each storage once (bitsandbytes shares its maps)."""
    inner = [optimizer.muon, optimizer.adamw] if isinstance(optimizer, optimizers.MuonWithAdamW) else [optimizer]
    storages = {}
    for opt in filter(None, inner):
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def _one_step(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    config = TrainingConfig(optimizer=name, learning_rate=1e-3)
    optimizer = optimizers.make_optimizer(model, config, "cpu")
    optimizers.training_mode(optimizer, config)
    ids = torch.arange(2, 34).reshape(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    unique = {id(p): p for p in model.parameters() if p.requires_grad}  # a tied copy once
    return list(unique.values())


@pytest.fixture(scope="module")
def tiny_meta(tiny_model_dir):
    return empty_model(AutoConfig.from_pretrained(tiny_model_dir))


@pytest.mark.parametrize("name", ["adamw", "sgd", "muon", "adamw_8bit", "schedule_free_adamw"])
def test_full_finetuning_plans_the_real_optimizer_state(name, tiny_model_dir, tiny_meta):
    needs = optimizers.NEEDS.get(name)
    if needs:
        import_optional(needs[0], f"optimizer {name} needs {needs[0]} ({needs[1]})")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    real = _state_bytes(_one_step(model, name))
    planned = parameter_bytes(tiny_meta, "full", dtype="fp32", optimizer=name)
    assert sum(e.optimizer for e in planned.values()) == real
    if name == "adamw":  # two fp32 moments per parameter and a 4-byte step count per tensor
        params = list(model.parameters())
        assert real == 8 * sum(p.numel() for p in params) + 4 * len(params)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_lora_with_modules_to_save_plans_the_real_trainable_bytes_and_state(name, tiny_model_dir, tiny_meta):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoRAConfig(modules_to_save=SAVED)
    model = add_adapters(model, lora, fused=False, frozen_base_bf16=False)
    trainable = _trainable(model)
    planned = parameter_bytes(tiny_meta, "lora", lora.r, optimizer=name, dtype="fp32", modules_to_save=SAVED)
    assert sum(e.gradients for e in planned.values()) == sum(p.numel() * p.element_size() for p in trainable)
    assert trainable_count(tiny_meta, "lora", lora.r, modules_to_save=SAVED) == sum(p.numel() for p in trainable)
    assert sum(e.optimizer for e in planned.values()) == _state_bytes(_one_step(model, name))
    # The copy is the embedding (tied to the head): without it, only the adapters train.
    embedding = tiny_meta.get_input_embeddings().weight.numel()
    assert trainable_count(tiny_meta, "lora", lora.r) == sum(p.numel() for p in trainable) - embedding


def test_aift_plan_takes_the_optimizer_and_modules_to_save(tiny_model_dir, capsys):
    def plan(*flags: str) -> dict:
        code = main(["plan", "--model", str(tiny_model_dir), "--max-length", "64", "--json", *flags])
        assert code == 0
        return json.loads(capsys.readouterr().out)

    adamw, sgd = plan(), plan("--optimizer", "sgd")
    assert sgd["optimizer"] == "sgd" and adamw["optimizer"] == "adamw"
    assert 0 < sgd["devices"][0]["optimizer_gb"] < adamw["devices"][0]["optimizer_gb"]
    saved = plan("--lora-modules-to-save", "embed_tokens,lm_head")
    embedding = AutoConfig.from_pretrained(tiny_model_dir)
    assert saved["trainable_params"] - adamw["trainable_params"] == embedding.vocab_size * embedding.hidden_size
