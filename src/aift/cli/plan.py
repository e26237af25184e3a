"""`aift plan`: the device map and memory per device that training would use, and whether it fits.

    aift plan --model elyza/Llama-3-ELYZA-JP-8B --gpus 2 --gpu-memory 24 --method lora
    aift plan --model ./my-model --max-memory '{0: "22GB", 1: "22GB"}' --method full --json

Only the model's config is read (no weights), so this runs on a laptop without GPUs. Exit status 0 when the
plan fits the GPUs, 1 when it does not (or needs CPU/disk offload).
"""

from __future__ import annotations

import argparse
import json

import yaml

from aift.cli.flags import add_field_flag
from aift.config import OPTIMIZERS, LoRAConfig, TrainingConfig
from aift.distributed.planning import PlanningError, plan_training
from aift.training.memory import DTYPE_BYTES, METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Alias, local folder or hub id.")
    parser.add_argument("--gpus", type=int, default=1, help="Number of GPUs to plan for.")
    parser.add_argument(
        "--gpu-memory", type=float, default=24, help="Memory of each GPU in GiB (as nvidia-smi shows it)."
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        help="Per-device budgets instead of --gpus/--gpu-memory, e.g. '{0: 22GB, 1: 22GB}'.",
    )
    parser.add_argument("--cpu-memory", type=float, default=64, help="CPU RAM in GB for offloaded modules.")
    # Not `aift train --method` (sft or a preference method): what the memory model tells apart is which weights
    # train, which `aift train` sets with a lora: mapping (lora) and lora.use_qlora=true (qlora).
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="lora",
        help="Which weights train: full (every weight), lora (adapters on a frozen base) or qlora (adapters on a "
        "4-bit base); as `aift train` without / with a lora: mapping, and with lora.use_qlora=true "
        "(default: %(default)s).",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Micro-batch size per forward pass.")
    add_field_flag(
        parser,
        TrainingConfig,
        "max_length",
        type=int,
        default=2048,
        differs_because="plans are for the long rows of GPU runs, where memory runs out (docs/scaling.md).",
    )
    add_field_flag(parser, LoRAConfig, "r", flag="--lora-r")
    add_field_flag(parser, LoRAConfig, "lora_dropout", flag="--lora-dropout")
    add_field_flag(parser, LoRAConfig, "target_modules", flag="--lora-target-modules", metavar="V")
    add_field_flag(parser, LoRAConfig, "modules_to_save", flag="--lora-modules-to-save", metavar="V")
    add_field_flag(parser, TrainingConfig, "optimizer", choices=OPTIMIZERS)
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPE_BYTES),
        default="bf16",
        help="What training holds the weights and computes in: bf16 (aift on CUDA GPUs), fp32 (a CPU, no autocast).",
    )
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="Recompute activations."
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")


def _max_memory(text: str | None):
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PlanningError(f"--max-memory: cannot read {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise PlanningError(f"--max-memory must be a mapping like '{{0: 22GB, 1: 22GB}}', got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    # Checked and split into names as training does.
    lora = LoRAConfig(target_modules=args.lora_target_modules, modules_to_save=args.lora_modules_to_save)
    plan = plan_training(
        args.model,
        gpus=args.gpus,
        gpu_memory_gb=args.gpu_memory,
        method=args.method,
        batch_size=args.batch_size,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        lora_dropout=args.lora_dropout,
        lora_targets=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        optimizer=args.optimizer,
        dtype=args.dtype,
        max_memory=_max_memory(args.max_memory),
        cpu_memory_gb=args.cpu_memory,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render())
    return 0 if plan.fits else 1
