"""FusedLoraLinear computes what peft's LoRA layer computes, and saves what peft saves."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from aift.lora.layer import FusedLoraLinear, register_fused_lora
from aift.lora.model import hold_frozen_in_bf16


def _lora_model(model_dir, fused: bool, bf16_base: bool = False, dropout: float = 0.0):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    if fused:
        register_fused_lora(config)
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that both adapter matrices get gradients
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    if bf16_base:
        hold_frozen_in_bf16(model)
    return model.train()


def _loss_and_grads(model, ids, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(2))


def test_fused_layers_replace_every_linear_target(tiny_model_dir):
    model = _lora_model(tiny_model_dir, fused=True)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and all(isinstance(m, FusedLoraLinear) for m in layers)


def test_fp32_loss_and_gradients_equal_peft(tiny_model_dir, token_ids):
    loss_peft, grads_peft = _loss_and_grads(_lora_model(tiny_model_dir, fused=False), token_ids, autocast=False)
    loss_fused, grads_fused = _loss_and_grads(_lora_model(tiny_model_dir, fused=True), token_ids, autocast=False)
    assert loss_fused == pytest.approx(loss_peft, rel=1e-6)
    assert grads_fused.keys() == grads_peft.keys()
    for name, grad in grads_peft.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_bf16_gradients_are_as_close_to_fp32_as_peft(tiny_model_dir, token_ids):
    """Under bf16 autocast with a bf16 base, both round differently; the fused layer must not be worse."""
    _, reference = _loss_and_grads(_lora_model(tiny_model_dir, fused=False), token_ids, autocast=False)
    _, peft = _loss_and_grads(_lora_model(tiny_model_dir, fused=False, bf16_base=True), token_ids, autocast=True)
    _, fused = _loss_and_grads(_lora_model(tiny_model_dir, fused=True, bf16_base=True), token_ids, autocast=True)

    def error(grads):
        return max(((grads[n].float() - g).norm() / g.norm()).item() for n, g in reference.items())

    assert error(fused) < 0.05
    assert error(fused) <= 1.5 * error(peft)


def test_dropout_merge_and_disabled_adapters_take_peft_path(tiny_model_dir, token_ids):
    dropped = _lora_model(tiny_model_dir, fused=True, dropout=0.1)
    layer = next(m for m in dropped.modules() if isinstance(m, FusedLoraLinear))
    assert layer._fusable_adapter(torch.zeros(1), (), {}) is None  # dropout while training
    dropped.eval()
    assert layer._fusable_adapter(torch.zeros(1), (), {}) == "default"  # dropout is off in eval

    model = _lora_model(tiny_model_dir, fused=True).eval()
    with torch.no_grad():
        adapted = model(input_ids=token_ids).logits
        with model.disable_adapter():
            base = model(input_ids=token_ids).logits
        model.merge_adapter()
        merged = model(input_ids=token_ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output...
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)  # ...and merging keeps it


def test_saved_adapter_is_plain_peft(tiny_model_dir, token_ids, tmp_path):
    model = _lora_model(tiny_model_dir, fused=True).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "custom" not in json.dumps(saved).lower()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()  # peft's own layers
    assert not any(isinstance(m, FusedLoraLinear) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=token_ids).logits, model(input_ids=token_ids).logits, rtol=1e-5, atol=1e-5
        )


def test_trainer_uses_fused_layers_for_lora_not_qlora(tiny_model_dir, fp32_config):
    from aift.config import LoRAConfig
    from aift.training.trainers import LoRAFinetuningTrainer

    lora = LoRAFinetuningTrainer(str(tiny_model_dir), LoRAConfig(lora_dropout=0.0), fp32_config())._prepare_model()
    assert any(isinstance(m, FusedLoraLinear) for m in lora.modules())
    plain = LoRAFinetuningTrainer(
        str(tiny_model_dir), LoRAConfig(lora_dropout=0.0), fp32_config(fused_lora=False)
    )._prepare_model()
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    qlora = LoRAFinetuningTrainer(
        str(tiny_model_dir), LoRAConfig(lora_dropout=0.0, use_qlora=True), fp32_config()
    )._prepare_model()
    assert not any(isinstance(m, FusedLoraLinear) for m in qlora.modules())
