"""gradient_checkpointing: selective gives the plain path's loss and gradients, and its recompute redoes no GEMM."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aift.config import LoRAConfig
from aift.training.selective import enable_selective_checkpointing
from aift.utils.gpu import enable_activation_checkpointing

MODES = ("off", "full", "selective")


def _model(tiny_model_dir, method: str, mode: str):
    from transformers import AutoModelForCausalLM

    from aift.lora.model import add_adapters

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if mode == "full":
        enable_activation_checkpointing(model)
    elif mode == "selective":
        assert enable_selective_checkpointing(model, 99) == 2  # every layer of the two
    if method == "full":
        return model
    model.enable_input_require_grads()
    model = add_adapters(model, LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.0), fused=True, frozen_base_bf16=False)
    for name, p in model.named_parameters():  # non-zero B so that every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


class _ProjectionGemms(TorchDispatchMode):
    """Counts the GEMMs with a projection's inner dimension (the hidden size, 64, or more)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = (args[0], args[1]) if func is torch.ops.aten.mm.default else (args[1], args[2])
            self.count += a.shape[-1] >= 64 and b.shape[-1] >= 64  # not an adapter's rank-8 side
        return func(*args, **(kwargs or {}))


def _run(model, batch):
    model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    loss = model(**inputs, use_cache=False).loss
    counter = _ProjectionGemms()
    with counter:
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.count


@pytest.mark.parametrize("method", ["lora", "full"])  # fused LoRA (the default) and a trained base
def test_selective_matches_the_plain_path_and_recomputes_no_gemm(tiny_model_dir, packed_batch, method):
    runs = {mode: _run(_model(tiny_model_dir, method, mode), packed_batch) for mode in MODES}
    off_loss, off_grads, off_gemms = runs["off"]
    for mode in ("full", "selective"):
        loss, grads, _ = runs[mode]
        torch.testing.assert_close(loss, off_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == off_grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(g, off_grads[k], rtol=1e-4, atol=1e-6, msg=f"{mode} {k}")
    # Full checkpointing redoes every projection in backward; selective redoes none of them.
    assert runs["full"][2] > off_gemms
    assert runs["selective"][2] == off_gemms


def test_selective_keeps_only_the_layers_it_is_given(tiny_model_dir, packed_batch):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = _model(tiny_model_dir, "full", "off")
    enable_selective_checkpointing(model, 1)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == [True, True]
    first, second = (layer._gradient_checkpointing_func for layer in layers)
    assert "context_fn" in first.keywords and "context_fn" not in second.keywords  # the second recomputes all
    _, _, gemms = _run(model, packed_batch)
    _, _, off_gemms = _run(_model(tiny_model_dir, "full", "off"), packed_batch)
    assert gemms > off_gemms
