"""fused_ops / fused_projections: the swapped Llama modules give the plain path's logits, loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from aift.config import LoRAConfig
from aift.training.fused_llama import fuse_modules, restore_modules


def _run(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize(("ops", "projections"), [(True, False), (False, True), (True, True)])
def test_fused_paths_equal_the_plain_path_on_packed_rows(tiny, packed_batch, lora, ops, projections):
    from aift.lora.model import add_adapters

    plain = copy.deepcopy(tiny)
    if lora:
        plain = add_adapters(plain, LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.0), fused=True,
                             frozen_base_bf16=False)  # fmt: skip
        for name, p in plain.named_parameters():  # non-zero B so that every adapter gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    fused = copy.deepcopy(plain)
    assert fuse_modules(fused, ops, projections) > 0
    ref_logits, ref_grads = _run(plain, packed_batch)
    logits, grads = _run(fused, packed_batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k, g in grads.items():
        assert ref_grads[k].abs().sum() > 0, k
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert restore_modules(fused) > 0
    assert "Fused" not in "".join(type(m).__name__ for m in fused.modules() if "Lora" not in type(m).__name__)
