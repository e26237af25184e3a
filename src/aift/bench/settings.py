"""What each trainer of a benchmark actually ran with, in one vocabulary, and where the two differ.

Each worker reads its trainer's own configuration objects (aift's TrainingConfig / LoRAConfig, TRL's
SFTConfig / DPOConfig and peft's LoraConfig) into the same named settings, so that ``results.md`` can list
every difference between the two runs instead of a hand-written claim that they are alike.
"""

from __future__ import annotations

from typing import Any

# aift's optimizers (TrainingConfig.optimizer) as results.md names them.
AIFT_OPTIMIZERS = {
    "adamw": "AdamW (torch, fused where supported), no decay on 1-D params",
    "adamw_8bit": "AdamW 8-bit (bitsandbytes), no decay on 1-D params",
    "paged_adamw_8bit": "paged AdamW 8-bit (bitsandbytes), no decay on 1-D params",
    "muon": "Muon (torch) on hidden matrices, AdamW on embeddings, head and 1-D params",
    "schedule_free_adamw": "schedule-free AdamW (schedulefree), no decay on 1-D params",
    "sgd": "SGD, momentum 0.9, no decay on 1-D params",
}

# The settings every trainer reports, in the order results.md lists them.
SETTING_NAMES = (
    "learning rate",
    "lr schedule",
    "warmup steps",
    "optimizer",
    "adam betas, eps",
    "weight decay",
    "max grad norm",
    "epochs",
    "rows per optimizer step",
    "gradient accumulation",
    "packing",
    "gradient checkpointing",
    "precision",
    "attention",
    "loss",
    "trained tokens",
    "LoRA",
    "LoRA layers",
    "torch.compile",
    "allocator",
    "seed",
)


def aift_settings(config, lora, allocator: str, trained_tokens: str, extra: dict | None = None) -> dict[str, str]:
    """aift's settings from its TrainingConfig and LoRAConfig (None for full fine-tuning), plus a method's own."""
    precision = "bf16 autocast" if config.bf16 else "fp32"
    if config.bf16 and config.frozen_base_bf16 and lora is not None:
        precision += ", frozen base weights held in bf16"
    else:
        precision += ", weights fp32"
    if not config.packing:  # segment attention serves packed rows only
        attention = "sdpa"
    elif config.segment_attention:
        attention = "segment attention (each packed example attends to itself)"
    else:
        attention = "sdpa with a block-diagonal mask per packed example"
    loss = (
        f"token mean, fused chunked linear cross-entropy (chunks of {config.loss_chunk_size})"
        if config.loss_chunk_size
        else "token mean, full logits"
    )
    settings = {
        "learning rate": config.learning_rate,
        "lr schedule": config.lr_scheduler,
        "warmup steps": config.warmup_steps if config.warmup_steps is not None else f"{config.warmup_ratio} of the run",
        "optimizer": AIFT_OPTIMIZERS[config.optimizer],
        "adam betas, eps": "(0.9, 0.999), 1e-08",  # torch's (and bitsandbytes', schedulefree's) defaults, kept
        "weight decay": config.weight_decay,
        "max grad norm": config.max_grad_norm,
        "epochs": config.num_epochs,
        "rows per optimizer step": f"{config.batch_size}" + (" packed rows" if config.packing else ""),
        "gradient accumulation": config.gradient_accumulation_steps,
        "packing": config.packing,
        "gradient checkpointing": config.gradient_checkpointing,
        "precision": precision,
        "attention": attention,
        "loss": loss,
        "trained tokens": trained_tokens,
        "LoRA": _lora(lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) if lora else "none (full)",
        "LoRA layers": ("aift's fused LoRA linear layers" if config.fused_lora else "peft") if lora else "-",
        "torch.compile": config.torch_compile,
        "allocator": allocator,
        "seed": config.seed,
    }
    return _as_text(settings, extra)


def trl_settings(
    args, peft_config, model, allocator: str, trained_tokens: str, extra: dict | None = None
) -> dict[str, str]:
    """TRL's settings from its SFTConfig / DPOConfig, peft's LoraConfig (or None) and the loaded model."""
    precision = ("bf16 autocast" if args.bf16 else "fp32") + ", weights fp32"
    attention = str(getattr(model.config, "_attn_implementation", None) or "default")
    loss = "token mean, full logits" if not getattr(args, "use_liger_kernel", False) else "token mean, Liger fused"
    settings = {
        "learning rate": args.learning_rate,
        "lr schedule": _name(args.lr_scheduler_type),
        "warmup steps": args.warmup_steps,
        "optimizer": _name(args.optim),
        "adam betas, eps": f"({args.adam_beta1}, {args.adam_beta2}), {args.adam_epsilon}",
        "weight decay": args.weight_decay,
        "max grad norm": args.max_grad_norm,
        "epochs": args.num_train_epochs,
        "rows per optimizer step": f"{args.per_device_train_batch_size}"
        + (" packed rows" if getattr(args, "packing", False) else " padded rows"),
        "gradient accumulation": args.gradient_accumulation_steps,
        "packing": bool(getattr(args, "packing", False)),
        "gradient checkpointing": args.gradient_checkpointing,
        "precision": precision,
        "attention": attention,
        "loss": loss,
        "trained tokens": trained_tokens,
        "LoRA": _lora(peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout, peft_config.target_modules)
        if peft_config is not None
        else "none (full)",
        "LoRA layers": "peft" if peft_config is not None else "-",
        "torch.compile": args.torch_compile,
        "allocator": allocator,
        "seed": args.seed,
    }
    return _as_text(settings, extra)


def differences(first: dict[str, str], second: dict[str, str]) -> list[str]:
    """The setting names whose values differ (a setting only one run has differs too), in listing order."""
    return [name for name in _names(first, second) if first.get(name) != second.get(name)]


def _names(first: dict[str, str], second: dict[str, str]) -> list[str]:
    """SETTING_NAMES, then a method's own settings in the order the runs give them."""
    return list(dict.fromkeys([*SETTING_NAMES, *first, *second]))


def settings_markdown(first_name: str, first: dict[str, str], second_name: str, second: dict[str, str]) -> list[str]:
    """A table of every setting of both runs, the differing ones first and marked."""
    differing = differences(first, second)
    names = _names(first, second)
    same = [name for name in names if name not in differing]
    lines = [
        f"{len(differing)} of {len(names)} settings differ between {first_name} and {second_name} "
        "(read from each trainer's own configuration objects in its process):",
        "",
        f"| setting | {first_name} | {second_name} | differs |",
        "| --- | --- | --- | --- |",
    ]
    for name in differing + same:
        mark = "**yes**" if name in differing else "no"
        lines.append(f"| {name} | {first.get(name, '-')} | {second.get(name, '-')} | {mark} |")
    return lines


def _lora(r: int, alpha: int, dropout: float, targets: Any) -> str:
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    return f"r={r}, alpha={alpha}, dropout={dropout}, targets={targets}"


def _name(value: Any) -> str:
    """An enum's value (TRL's SchedulerType.LINEAR -> 'linear'), else the value itself."""
    return str(getattr(value, "value", value))


def _as_text(settings: dict[str, Any], extra: dict | None) -> dict[str, str]:
    missing = set(SETTING_NAMES) - settings.keys()
    if missing:
        raise ValueError(f"internal: settings missing {sorted(missing)}")
    return {name: _text(value) for name, value in {**settings, **(extra or {})}.items()}


def _text(value: Any) -> str:
    """1.0 and 1 read the same (aift's num_epochs is a float, TRL's may be an int)."""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    return str(value)
