"""The fused cross-entropy is the default and steps aside, with a log line, where it cannot work (#28)."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
import yaml

from aift.config import TrainingConfig
from aift.training.loss import usable_loss_chunk

LOG = "aift.training.loss"


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_on_by_default():
    assert TrainingConfig().loss_chunk_size > 0


def test_a_plain_head_keeps_the_fused_loss(tiny_model, caplog):
    with caplog.at_level(logging.INFO, LOG):
        assert usable_loss_chunk(tiny_model, 1024) == 1024
    assert "fused cross-entropy off" not in caplog.text


def test_zero_stays_off(tiny_model):
    assert usable_loss_chunk(tiny_model, 0) == 0


def _off(model, caplog, accelerator_kwargs=None) -> str:
    with caplog.at_level(logging.INFO, LOG):
        assert usable_loss_chunk(model, 1024, accelerator_kwargs) == 0
    (line,) = [r.getMessage() for r in caplog.records if "fused cross-entropy off" in r.getMessage()]
    return line


def test_steps_aside_for_a_biased_head(tiny_model, caplog):
    model = copy.deepcopy(tiny_model)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    model.set_output_embeddings(biased)
    assert "bias-free nn.Linear lm_head" in _off(model, caplog)


@pytest.mark.parametrize("field", ["final_logit_softcapping", "logit_scale"])
def test_steps_aside_for_a_transformed_head(tiny_model, caplog, field):
    model = copy.deepcopy(tiny_model)
    setattr(model.config, field, 30.0)
    assert field in _off(model, caplog)


def test_steps_aside_for_an_adapter_on_lm_head(tiny_model, caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["lm_head"]))
    assert "lm_head" in _off(model, caplog)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"fsdp_plugin": SimpleNamespace(fsdp_version=2)}, "FSDP"),
        ({"deepspeed_plugin": SimpleNamespace(zero_stage=3)}, "DeepSpeed ZeRO-3"),
    ],
)
def test_steps_aside_for_weights_sharded_outside_forward(tiny_model, caplog, kwargs, named):
    assert named in _off(tiny_model, caplog, kwargs)


def test_zero_2_keeps_it(tiny_model):
    assert usable_loss_chunk(tiny_model, 1024, {"deepspeed_plugin": SimpleNamespace(zero_stage=2)}) == 1024


def test_the_cli_default_run_trained_with_it(trained_lora_run):
    """`aift train` without a loss flag ran the fused loss: config.yaml records the chunk that ran."""
    _, run = trained_lora_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["TrainingConfig"]["loss_chunk_size"] == TrainingConfig().loss_chunk_size
