"""`aift train [CONFIG.yaml] [key=value ...] [--flags]`: fine-tune (full, LoRA, QLoRA), SFT or preference.

The YAML holds TrainingConfig keys at the top level and, for LoRA/QLoRA, a ``lora:`` mapping of LoRAConfig
keys (its presence means LoRA; ``lora: {use_qlora: true}`` means QLoRA)::

    model_name: smollm2-135m-instruct
    dataset_path: data/prepared/ja_qa
    learning_rate: 3.0e-4
    lora:
      r: 16
      target_modules: all-linear

Preference tuning: ``--method dpo|orpo|simpo|kto`` (or ``method: dpo`` in the YAML), its options in a
``preference:`` mapping, as ``preference.beta=0.2`` or as flags (``--beta 0.2``); data from
``aift prepare --task preference``.

Precedence: YAML < ``key=value`` overrides (``lora.r=8`` for LoRA keys) < flags. Unknown keys are errors
with a suggestion. ``python scripts/train_sft.py`` takes exactly the same arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from aift.config import (
    ConfigError,
    LoRAConfig,
    MultiGPUTrainingConfig,
    PreferenceConfig,
    TrainingConfig,
    field_help,
    from_dict,
    load_yaml,
    parse_overrides,
)

# MultiGPUTrainingConfig keys: their presence (YAML, key=value or --strategy) selects AdvancedMultiGPUTrainer.
_MULTI_KEYS = {"strategy", "max_memory_per_gpu", "pipeline_parallel_size", "tensor_parallel_size"}

# Set by the launcher, never by hand.
_LAUNCHER_FIELDS = {"ddp", "local_rank", "world_size"}
# LoRA flags of the SFT guide -> LoRAConfig field.
_LORA_FLAGS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="a YAML config and/or key=value overrides (lora.KEY=value for LoRA keys)",
    )
    help_of = field_help(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        if f.name in _LAUNCHER_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_of[f.name])
        else:
            parser.add_argument(flag, default=None, metavar="V", help=help_of[f.name])
    lora_help = field_help(LoRAConfig)
    lora = parser.add_argument_group("LoRA / QLoRA")
    lora.add_argument("--use-lora", action="store_true", default=None, help="Train LoRA adapters (peft).")
    for flag, name in _LORA_FLAGS.items():
        lora.add_argument("--" + flag.replace("_", "-"), default=None, metavar="V", help=lora_help[name])
    lora.add_argument("--use-4bit", action="store_true", default=None, help="QLoRA: base in 4-bit NF4.")
    lora.add_argument("--use-8bit", action="store_true", default=None, help="QLoRA: base in 8-bit.")
    lora.add_argument("--use-dora", action="store_true", default=None, help=lora_help["use_dora"])
    lora.add_argument("--use-rslora", action="store_true", default=None, help=lora_help["use_rslora"])
    lora.add_argument("--merge", action="store_true", help="After LoRA training, also save a merged model.")
    pref_help = field_help(PreferenceConfig)
    pref = parser.add_argument_group("preference tuning (--method)")
    pref.add_argument("--method", default=None, choices=("sft", "dpo", "orpo", "simpo", "kto"), help=(
        "sft (default) or a preference method: " + pref_help["method"]))  # fmt: skip
    for f in dataclasses.fields(PreferenceConfig):
        if f.name == "method":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            pref.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=pref_help[f.name])
        else:
            pref.add_argument(flag, default=None, metavar="V", help=pref_help[f.name])
    from aift.distributed.launch import add_launch_arguments

    add_launch_arguments(parser)


def resolve_preference(args: argparse.Namespace) -> PreferenceConfig | None:
    """The preference config (None for SFT) from the YAML's method / preference:, preference.KEY=value and flags."""
    yaml_files = [i for i in args.items if "=" not in i]
    values: dict[str, Any] = load_yaml(yaml_files[0]) if len(yaml_files) == 1 else {}
    section = values.get("preference") or {}
    if not isinstance(section, dict):
        raise ConfigError("'preference:' must be a mapping of PreferenceConfig keys")
    section = dict(section)
    method = values.get("method")
    for key, value in parse_overrides([i for i in args.items if "=" in i]).items():
        if key == "method":
            method = value
        elif key.startswith("preference."):
            section[key[len("preference.") :]] = value
    for f in dataclasses.fields(PreferenceConfig):
        if f.name != "method" and getattr(args, f.name, None) is not None:
            section[f.name] = getattr(args, f.name)
    method = args.method or method or section.pop("method", None) or "sft"
    section.pop("method", None)
    if method == "sft":
        if section:
            raise ConfigError(f"preference options {sorted(section)} need --method dpo|orpo|simpo|kto")
        return None
    return from_dict(PreferenceConfig, {**section, "method": method})


def resolve_configs(args: argparse.Namespace) -> tuple[TrainingConfig, LoRAConfig | None]:
    """YAML, then key=value overrides, then flags -> (TrainingConfig, LoRAConfig or None for full)."""
    yaml_files = [i for i in args.items if "=" not in i]
    if len(yaml_files) > 1:
        raise ConfigError(f"expected one config file, got {yaml_files}; overrides are key=value")
    values: dict[str, Any] = load_yaml(yaml_files[0]) if yaml_files else {}
    values.pop("method", None), values.pop("preference", None)  # read by resolve_preference
    lora_values = values.pop("lora", None)
    if lora_values is not None and not isinstance(lora_values, dict):
        raise ConfigError("'lora:' must be a mapping of LoRAConfig keys (or be left out for full fine-tuning)")
    lora_values = dict(lora_values or {}) if lora_values is not None else None

    for key, value in parse_overrides([i for i in args.items if "=" in i]).items():
        if key == "method" or key.startswith("preference."):
            continue
        if key.startswith("lora."):
            lora_values = {**(lora_values or {}), key[len("lora.") :]: value}
        else:
            values[key] = value

    for f in dataclasses.fields(TrainingConfig):
        flag_value = getattr(args, f.name, None)
        if f.name not in _LAUNCHER_FIELDS and flag_value is not None:
            values[f.name] = flag_value
    lora_values = _lora_flags(args, lora_values)
    for key in ("strategy", "max_memory_per_gpu"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    training = from_dict(MultiGPUTrainingConfig if _MULTI_KEYS & values.keys() else TrainingConfig, values)
    return training, from_dict(LoRAConfig, lora_values) if lora_values is not None else None


def _lora_flags(args: argparse.Namespace, lora_values: dict | None) -> dict | None:
    given = {name: getattr(args, flag) for flag, name in _LORA_FLAGS.items() if getattr(args, flag) is not None}
    if args.use_4bit and args.use_8bit:
        raise ConfigError("choose one of --use-4bit and --use-8bit")
    if args.use_4bit or args.use_8bit:
        given.update(use_qlora=True, qlora_4bit=bool(args.use_4bit))
    given.update({k: True for k in ("use_dora", "use_rslora") if getattr(args, k)})
    if args.use_lora or given:
        return {**(lora_values or {}), **given}
    return lora_values


def run(args: argparse.Namespace) -> int:
    from aift.training.trainers import train_from_config

    training, lora = resolve_configs(args)
    preference = resolve_preference(args)
    if args.nproc_per_node is not None:
        from aift.distributed.launch import launch_options, launch_training

        return launch_training(launch_options(args), training, lora, merge=args.merge, preference=preference)
    if preference is not None:
        from aift.training.preference import train_preference_from_config

        result = train_preference_from_config(training, preference, lora, merge=args.merge)
    elif isinstance(training, MultiGPUTrainingConfig) or training.deepspeed or training.world_size > 1:
        from aift.training.multi_gpu import train_multi_gpu_from_config

        result = train_multi_gpu_from_config(training, lora, merge=args.merge)
    else:
        result = train_from_config(training, lora, merge=args.merge)
    s = result.summary
    if os.environ.get("RANK", "0") != "0":
        return 0  # under a launcher, rank 0 reports for all
    method = s["method"] if preference is None else f"{preference.method}, {s['method']}"
    print(
        f"trained {s['steps']} steps ({method}), final train loss {s['final_train_loss']:.4f}"
        + (f", eval loss {s['final_eval_loss']:.4f}" if s["final_eval_loss"] is not None else "")
    )
    print(f"output: {result.output_dir} (final model in {result.output_dir / 'final'})")
    return 0
