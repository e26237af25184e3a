"""``gradient_checkpointing: auto``: recompute activations only where the run would not fit without it.

Checkpointing trades about a third more compute per step for activation memory. A 135M model at batch 8 x 512
fits a laptop without it, a 7B model at 4 x 2048 does not fit a 24 GB GPU with it off: the right setting
depends on the run, so `aift train` decides it from the same memory model as `aift plan`
(:mod:`aift.training.memory`, checked against measured peaks in ``bench/results/plan``) and says what it
decided and why. ``TrainingConfig``'s Python default stays ``True``; a bool is never second-guessed.

The budget is the device's total memory (a GPU's, or this machine's RAM, cgroup limit included, shared by the
processes of the node), not what happens to be free: every process of a data-parallel run must reach the same
decision, whenever it asks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from aift.config import TrainingConfig
from aift.training.memory import (
    CUDA_CONTEXT_BYTES,
    LORA_R,
    activation_model,
    dropout_width,
    empty_model,
    load_model_config,
    one_device_estimate,
    parameter_bytes,
)

log = logging.getLogger(__name__)

# Share of the budget the plan may fill with checkpointing off. The planner is within 7 % of measured peaks;
# the rest covers what it does not count: the data, the tokenizer, the allocator's slack, the eval pass.
HEADROOM = 0.8
GB = 1e9


def resolve_gradient_checkpointing(
    config: TrainingConfig,
    model: Any,
    *,
    method: str,
    device_type: str,
    lora_r: int = LORA_R,
    lora_dropout: float = 0.0,
    lora_targets: str | list[str] | None = None,
    rows_per_example: int = 1,
    trust_remote_code: bool = False,
) -> bool:
    """``config.gradient_checkpointing`` as a bool: itself when it is one; for ``"auto"``, the plan's verdict.

    Args:
        config: The run's settings (batch size, length, strategy).
        model: A transformers config, a model alias, folder or hub id (only its config is read).
        method: full, lora or qlora.
        device_type: "cuda" or "cpu" (anything else: on, since its memory is unknown here).
        lora_r: Adapter rank (lora, qlora).
        lora_dropout: Adapter dropout (its copies of the inputs are activations too).
        lora_targets: The adapted modules, as LoRAConfig's ``target_modules`` (None: all-linear).
        rows_per_example: Rows one example puts through the model (2 for a preference pair: chosen and rejected).
        trust_remote_code: As for loading the model's config.
    """
    value = config.gradient_checkpointing
    if isinstance(value, bool):
        return value
    if config.strategy != "ddp":
        log.info("gradient checkpointing: auto -> on (strategy %s: memory per device is not one model copy)",
                 config.strategy)  # fmt: skip
        return True
    budget, where = memory_budget(device_type)
    if budget is None:
        log.info("gradient checkpointing: auto -> on (%s memory is unknown here)", device_type)
        return True
    needed = planned_bytes_without_checkpointing(
        config, model, method=method, device_type=device_type, lora_r=lora_r, lora_dropout=lora_dropout,
        lora_targets=lora_targets, rows_per_example=rows_per_example, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    decision = needed > HEADROOM * budget
    log.info(
        "gradient checkpointing: auto -> %s (without it the plan needs %.1f GB; %s: %.1f GB, %d %% usable)",
        "on" if decision else "off", needed / GB, where, budget / GB, round(HEADROOM * 100),
    )  # fmt: skip
    return decision


def planned_bytes_without_checkpointing(
    config: TrainingConfig,
    model: Any,
    *,
    method: str,
    device_type: str,
    lora_r: int,
    lora_dropout: float,
    rows_per_example: int,
    trust_remote_code: bool,
    lora_targets: str | list[str] | None = None,
) -> float:
    """What `aift plan` says one process of this run holds at its peak with checkpointing off, in bytes."""
    import torch

    from aift.models.loading import default_dtype

    dtype = "fp32" if default_dtype(device_type) == torch.float32 else "bf16"
    model_config = load_model_config(model, trust_remote_code)
    meta = empty_model(model_config)
    per_param = parameter_bytes(meta, method, lora_r, lora_targets, dtype=dtype)
    width = dropout_width(meta, method, lora_dropout, lora_targets)
    rows = config.batch_size * rows_per_example
    acts = activation_model(model_config, rows, config.max_length, False, dtype, width)
    total = one_device_estimate(meta, per_param, acts).total
    return total + CUDA_CONTEXT_BYTES if device_type == "cuda" else total


def memory_budget(device_type: str) -> tuple[float | None, str]:
    """(bytes one process may use, where they come from): a GPU's total memory, or the RAM of this node's share."""
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        return float(torch.cuda.get_device_properties(index).total_memory), f"GPU {index}"
    if device_type != "cpu":
        return None, device_type
    ram = machine_ram_bytes()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    where = "RAM" if processes == 1 else f"RAM / {processes} processes of this node"
    return ram / processes, where


def machine_ram_bytes() -> float:
    """This machine's RAM, or the container's memory limit (cgroup v2 or v1) when that is lower."""
    import psutil

    total = float(psutil.virtual_memory().total)
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, float(text))
    return total
