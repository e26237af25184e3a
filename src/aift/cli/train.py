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
``aift prepare --task preference``. GRPO: ``--method grpo --reward exact_match --reward-weights 1``, its options
in a ``grpo:`` mapping (``grpo.num_generations=8``) or as flags; data from ``aift prepare --task sft``.

Precedence: the command line's defaults (``gradient_checkpointing: auto``) < YAML < ``key=value`` overrides
(``lora.r=8`` for LoRA keys) < flags. Unknown keys are errors with a suggestion. ``python scripts/train_sft.py`` takes exactly the same arguments.

This module only maps argparse to the library: :func:`aift.training.configs.resolve_train_configs` resolves, and
:func:`aift.distributed.entry.train` picks the trainer, for the web UI and Python callers alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from aift.cli.flags import add_field_flag
from aift.config import (
    FRONT_DOOR_DEFAULTS,
    ConfigError,
    LoRAConfig,
    TrainingConfig,
    field_help,
)
from aift.training.configs import TrainConfigs, resolve_train_configs
from aift.training.methods import METHODS, sections

# Set only through YAML or key=value (--strategy and --max-memory-per-gpu come with the launch flags).
_NO_FLAG = {"world_size", "strategy", "max_memory_per_gpu", "pipeline_parallel_size", "pipeline_schedule"}
# LoRA flags of the SFT guide -> LoRAConfig field.
_LORA_FLAGS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="a YAML config and/or key=value overrides (lora.KEY=value for LoRA keys)",
    )
    for f in dataclasses.fields(TrainingConfig):
        if f.name in _NO_FLAG:
            continue
        if f.type in ("bool", bool, "bool | str"):
            # A bool-or-word field (gradient_checkpointing: auto) keeps --flag / --no-flag: an optional value
            # would swallow a config file that follows it. The word is a key=value or YAML value.
            add_field_flag(parser, TrainingConfig, f.name, default=None, action=argparse.BooleanOptionalAction)
        else:
            add_field_flag(parser, TrainingConfig, f.name, default=None, metavar="V")
    lora_help = field_help(LoRAConfig)
    lora = parser.add_argument_group("LoRA / QLoRA")
    lora.add_argument("--use-lora", action="store_true", default=None, help="Train LoRA adapters (peft).")
    for flag, name in _LORA_FLAGS.items():
        add_field_flag(lora, LoRAConfig, name, flag="--" + flag.replace("_", "-"), default=None, metavar="V")
    lora.add_argument("--use-4bit", action="store_true", default=None, help="QLoRA: base in 4-bit NF4.")
    lora.add_argument("--use-8bit", action="store_true", default=None, help="QLoRA: base in 8-bit.")
    lora.add_argument("--use-dora", action="store_true", default=None, help=lora_help["use_dora"])
    lora.add_argument("--use-rslora", action="store_true", default=None, help=lora_help["use_rslora"])
    lora.add_argument("--merge", action="store_true", help="After LoRA training, also save a merged model.")
    _add_method_arguments(parser)
    from aift.distributed.launch import add_launch_arguments

    add_launch_arguments(parser)


# Method options whose flag is not --field-name, and how they parse (GRPO's rewards: one --reward per function).
_METHOD_FLAGS = {"rewards": ("--reward", {"action": "append", "metavar": "SPEC", "dest": "rewards"})}


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--method from the registry (aift.training.methods), then each options section's flags (--beta ...).

    A flag two sections share (``--beta`` of DPO and of GRPO) is one flag; its value goes to the options of the
    chosen method, and its help says what it means for each.
    """
    methods = parser.add_argument_group("method (--method)")
    listing = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    methods.add_argument("--method", default=None, choices=list(METHODS), help=f"sft (default). {listing}")
    added: dict[str, argparse.Action] = {}
    for section, cls in sections().items():
        names = "|".join(m.name for m in METHODS.values() if m.section == section)
        group = parser.add_argument_group(f"{section} options (--method {names})")
        for f in _option_fields(cls):
            if f.name in added:
                added[f.name].help += f" [{section}] {f.metadata.get('help', '')}"
                continue
            flag, kwargs = _METHOD_FLAGS.get(f.name, (None, {}))
            if not kwargs:
                is_bool = f.type in ("bool", bool)
                kwargs = {"action": argparse.BooleanOptionalAction} if is_bool else {"metavar": "V"}
            added[f.name] = add_field_flag(group, cls, f.name, flag=flag, default=None, **kwargs)


def _option_fields(cls: type) -> list[dataclasses.Field]:
    """A method config's fields that are flags (``method`` itself is --method)."""
    return [f for f in dataclasses.fields(cls) if f.name != "method"]


def _method_option_names() -> list[str]:
    return list(dict.fromkeys(f.name for cls in sections().values() for f in _option_fields(cls)))


def resolve(args: argparse.Namespace) -> TrainConfigs:
    """The parsed command line -> the library's one resolution (YAML < key=value overrides < flags)."""
    yaml_files = [i for i in args.items if "=" not in i]
    if len(yaml_files) > 1:
        raise ConfigError(f"expected one config file, got {yaml_files}; overrides are key=value")
    training = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig) if f.name not in _NO_FLAG}
    training.update(strategy=args.strategy, max_memory_per_gpu=args.max_memory_per_gpu)
    options = {name: getattr(args, name) for name in _method_option_names()}
    return resolve_train_configs(
        yaml_files[0] if yaml_files else None,
        [i for i in args.items if "=" in i],
        training=_given(training),
        lora=_lora_flags(args),
        method_options=_given(options),
        method=args.method,
        defaults=FRONT_DOOR_DEFAULTS,
    )


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _lora_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """LoRAConfig values from the LoRA flags; None when no flag asks for LoRA."""
    given = {name: getattr(args, flag) for flag, name in _LORA_FLAGS.items() if getattr(args, flag) is not None}
    if args.use_4bit and args.use_8bit:
        raise ConfigError("choose one of --use-4bit and --use-8bit")
    if args.use_4bit or args.use_8bit:
        given.update(use_qlora=True, qlora_4bit=bool(args.use_4bit))
    given.update({k: True for k in ("use_dora", "use_rslora") if getattr(args, k)})
    return given if args.use_lora or given else None


def run(args: argparse.Namespace) -> int:
    configs = resolve(args)
    if args.nproc_per_node is not None:
        from aift.distributed.launch import launch_options, launch_training

        return launch_training(launch_options(args), configs, merge=args.merge)
    from aift.distributed.entry import train

    result = train(configs.training, configs.lora, configs.preference, merge=args.merge, grpo=configs.grpo)
    s = result.summary
    if os.environ.get("RANK", "0") != "0":
        return 0  # under a launcher, rank 0 reports for all
    method = s["method"] if configs.method == "sft" else f"{configs.method}, {s['method']}"
    print(
        f"trained {s['steps']} steps ({method}), final train loss {s['final_train_loss']:.4f}"
        + (f", eval loss {s['final_eval_loss']:.4f}" if s["final_eval_loss"] is not None else "")
    )
    from aift.models.run_folder import FINAL_DIR

    print(f"output: {result.output_dir} (final model in {result.output_dir / FINAL_DIR})")
    return 0
