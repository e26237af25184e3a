"""Adapters on a model: peft's LoraConfig from ours, the trainable peft wrapper, and loading a saved adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from aift.config import LoRAConfig


def peft_config(lc: LoRAConfig, fused: bool = False):
    """peft's LoraConfig from ours; no target modules means every linear layer except the output head.

    With ``fused``, plain ``nn.Linear`` targets get :class:`aift.lora.layer.FusedLoraLinear`
    (unquantized bases only: bitsandbytes' layers subclass ``nn.Linear`` too).
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=lc.r,
        lora_alpha=lc.lora_alpha,
        lora_dropout=lc.lora_dropout,
        target_modules=lc.target_modules or "all-linear",
        bias=lc.bias,
        task_type=lc.task_type,
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        modules_to_save=lc.modules_to_save,
        # A tied embedding and head trained in full stay one matrix (else the saved head is lost on reload).
        ensure_weight_tying=bool(lc.modules_to_save),
    )
    if fused:
        from aift.lora.layer import register_fused_lora

        register_fused_lora(config)
    return config


def add_adapters(model: torch.nn.Module, lc: LoRAConfig, fused: bool, frozen_base_bf16: bool) -> torch.nn.Module:
    """Wraps a (prepared) base model in peft's trainable LoRA model; only the adapters require grad."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(lc, fused=fused))
    if frozen_base_bf16:
        hold_frozen_in_bf16(model)
    model.print_trainable_parameters()
    return model


def hold_frozen_in_bf16(model: torch.nn.Module) -> None:
    """Casts the frozen floating-point weights to bf16; trainable adapters stay fp32 (their optimizer too)."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)


def load_lora_model(base_model_name: str, lora_adapter_path: str | Path, device: str | None = None):
    """Loads a base model and applies a saved LoRA adapter (or a run dir's); returns (model in eval mode, tokenizer).

    The tokenizer saved with the adapter wins over the base's (tokens added in training).
    """
    from aift.models.run_folder import open_run

    run = open_run(base_model_name, lora_adapter_path, device=device)
    return run.model.eval(), run.tokenizer
