"""``gradient_checkpointing: auto``: recompute activations only where the run would not fit without it.

Checkpointing trades about a third more compute per step for activation memory. A 135M model at batch 8 x 512
fits a laptop without it, a 7B model at 4 x 2048 does not fit a 24 GB GPU with it off: the right setting
depends on the run, so `aift train` decides it from the same memory model as `aift plan`
(:mod:`aift.training.memory`, checked against measured peaks in ``bench/results/plan``) and says what it
decided and why. ``TrainingConfig``'s Python default stays ``True``; a bool is never second-guessed.

Between the two, ``selective`` (:mod:`aift.training.selective`) keeps each layer's GEMM and attention outputs
and recomputes only its element-wise ops: less memory saved than by full checkpointing (for SmolLM2-135M
the plan keeps 5h + 2kv + 2i of the 6h + 2kv + 4i elements per token and layer), at a fraction of its time
(``bench/results/checkpointing``). It fills as many layers as the plan fits (:func:`selective_layer_count`), the others fully
recomputed; ``auto`` takes it where the run does not fit without checkpointing but at least one selective
layer does.

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
    layer_prefix_of,
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
    modules_to_save: list[str] | None = None,
) -> bool | str:
    """``config.gradient_checkpointing`` as run: a bool or ``"selective"`` as given; for ``"auto"``, the plan's verdict.

    auto: off where the run fits without checkpointing; else selective where at least one layer can keep its
    GEMM outputs (:func:`selective_layer_count`); else on.

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
        modules_to_save: LoRAConfig's modules trained in full beside the adapters (their copies count).
    """
    value = config.gradient_checkpointing
    if value != "auto":
        return value
    if config.strategy != "ddp":
        log.info("gradient checkpointing: auto -> on (strategy %s: memory per device is not one model copy)",
                 config.strategy)  # fmt: skip
        return True
    budget, where = memory_budget(device_type)
    if budget is None:
        log.info("gradient checkpointing: auto -> on (%s memory is unknown here)", device_type)
        return True
    plan = _Plan(config, model, method=method, device_type=device_type, lora_r=lora_r, lora_dropout=lora_dropout,
                 lora_targets=lora_targets, rows_per_example=rows_per_example, trust_remote_code=trust_remote_code,
                 modules_to_save=modules_to_save)  # fmt: skip
    needed, usable = plan.bytes(checkpointing=False), HEADROOM * budget
    selective = plan.layers_that_fit(usable) if needed > usable else 0
    decision = "off" if needed <= usable else "selective" if selective else "on"
    log.info(
        "gradient checkpointing: auto -> %s (without it the plan needs %.1f GB; %s: %.1f GB, %d %% usable)",
        decision, needed / GB, where, budget / GB, round(HEADROOM * 100),
    )  # fmt: skip
    return {"off": False, "on": True}.get(decision, decision)


def selective_layer_count(config: TrainingConfig, model: Any, *, n_layers: int, device_type: str, **plan: Any) -> int:
    """Of ``n_layers`` decoder layers, how many keep their GEMM outputs under selective checkpointing.

    All of them where the plan fits the budget (or the budget is unknown: a strategy that splits the model, a
    device whose memory is not known here); else the most that fit, the others fully recomputed. ``plan``: the
    keyword arguments of :func:`resolve_gradient_checkpointing` (method, lora_r, ...).
    """
    budget, where = memory_budget(device_type) if config.strategy == "ddp" else (None, config.strategy)
    if budget is None:
        return n_layers
    fits = _Plan(config, model, device_type=device_type, **plan).layers_that_fit(HEADROOM * budget)
    if fits < n_layers:
        log.info("selective checkpointing: %d of %d layers keep their GEMM outputs (%s: %.1f GB, %d %% usable)",
                 fits, n_layers, where, budget / GB, round(HEADROOM * 100))  # fmt: skip
    return fits


class _Plan:
    """What `aift plan` says one process of this run holds at its peak, for each checkpointing choice."""

    def __init__(self, config: TrainingConfig, model: Any, *, method: str, device_type: str, lora_r: int = LORA_R,
                 lora_dropout: float = 0.0, lora_targets: str | list[str] | None = None, rows_per_example: int = 1,
                 trust_remote_code: bool = False, modules_to_save: list[str] | None = None) -> None:  # fmt: skip
        import torch

        from aift.models.loading import default_dtype

        self.dtype = "fp32" if default_dtype(device_type) == torch.float32 else "bf16"
        self.model_config = load_model_config(model, trust_remote_code)
        self.meta = empty_model(self.model_config)
        self.per_param = parameter_bytes(self.meta, method, lora_r, lora_targets, self.dtype, config.optimizer,
                                        modules_to_save)  # fmt: skip
        self.width = dropout_width(self.meta, method, lora_dropout, lora_targets)
        self.rows, self.length = config.batch_size * rows_per_example, config.max_length
        self.context = CUDA_CONTEXT_BYTES if device_type == "cuda" else 0.0
        self.n_layers = len(self.meta.get_submodule(layer_prefix_of(self.meta)))

    def bytes(self, checkpointing: bool, selective_layers: int = 0) -> float:
        acts = activation_model(self.model_config, self.rows, self.length, checkpointing, self.dtype, self.width,
                                selective_layers)  # fmt: skip
        return one_device_estimate(self.meta, self.per_param, acts).total + self.context

    def layers_that_fit(self, usable: float) -> int:
        """The most layers that can keep their GEMM outputs within ``usable`` bytes (0: full checkpointing)."""
        full = self.bytes(True)
        per_layer = (self.bytes(True, self.n_layers) - full) / self.n_layers
        return max(0, min(self.n_layers, int((usable - full) // per_layer))) if per_layer > 0 else self.n_layers


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
    modules_to_save: list[str] | None = None,
) -> float:
    """What `aift plan` says one process of this run holds at its peak with checkpointing off, in bytes."""
    plan = _Plan(config, model, method=method, device_type=device_type, lora_r=lora_r, lora_dropout=lora_dropout,
                 lora_targets=lora_targets, rows_per_example=rows_per_example, trust_remote_code=trust_remote_code,
                 modules_to_save=modules_to_save)  # fmt: skip
    return plan.bytes(checkpointing=False)


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
