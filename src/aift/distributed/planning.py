"""Where a model goes and how much memory training takes on each device, before any weight is loaded.

The model is built from its config on the meta device (accelerate's ``init_empty_weights``: no memory,
no download of weights), so planning a 70B model takes a second on a laptop. The device map comes from
accelerate's ``infer_auto_device_map``, the same function ``device_map="auto"`` uses when loading, with
the budgets you give (``{0: "22GB", 1: "22GB"}``): nothing here asks the machine what it has.

What each byte is for (weights, gradients, optimizer states, activations, logits) is the memory model of
:mod:`aift.training.memory`; this module places it on devices and budgets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aift.config import LoRAConfig
from aift.training.memory import (
    CUDA_CONTEXT_BYTES,
    ActivationModel,
    MemoryEstimate,
    PlanningError,
    activation_model,
    dropout_width,
    empty_model,
    gradient_in_flight,
    head_param_name,
    layer_prefix_of,
    load_model_config,
    parameter_bytes,
    trainable_count,
    unique_parameters,
)

GB = 1024**3


@dataclass
class DevicePlan:
    """One device of a model-parallel plan: what it holds and whether that fits its budget."""

    device: str  # "0", "1", ... for GPUs, "cpu", "disk"
    modules: list[str]
    estimate: MemoryEstimate
    budget: float | None  # bytes; None for disk

    @property
    def is_gpu(self) -> bool:
        return self.device.isdigit()

    @property
    def needed(self) -> float:
        return self.estimate.total + (CUDA_CONTEXT_BYTES if self.is_gpu else 0.0)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.needed <= self.budget


@dataclass
class TrainingPlan:
    """The device map and memory per device of one training setup; ``render()`` prints it."""

    model: str
    method: str
    optimizer: str
    gpus: int
    gpu_memory_gb: float
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    dtype: str
    params: int
    trainable_params: int
    device_map: dict[str, Any]
    devices: list[DevicePlan]
    per_gpu_by_strategy: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def offloaded(self) -> bool:
        return any(not d.is_gpu for d in self.devices)

    @property
    def fits(self) -> bool:
        """Every GPU within its budget and nothing offloaded to CPU or disk."""
        return all(d.fits for d in self.devices) and not self.offloaded

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "optimizer": self.optimizer,
            "gpus": self.gpus,
            "gpu_memory_gb": self.gpu_memory_gb,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "gradient_checkpointing": self.gradient_checkpointing,
            "dtype": self.dtype,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "fits": self.fits,
            "offloaded": self.offloaded,
            "device_map": {k: str(v) for k, v in self.device_map.items()},
            "devices": [
                {
                    "device": d.device,
                    "modules": len(d.modules),
                    "weights_gb": d.estimate.weights / GB,
                    "gradients_gb": d.estimate.gradients / GB,
                    "optimizer_gb": d.estimate.optimizer / GB,
                    "activations_gb": d.estimate.activations / GB,
                    "needed_gb": d.needed / GB,
                    "budget_gb": None if d.budget is None else d.budget / GB,
                    "fits": d.fits,
                }
                for d in self.devices
            ],
            "per_gpu_gb_by_strategy": {k: v / GB for k, v in self.per_gpu_by_strategy.items()},
            "notes": self.notes,
        }

    def render(self) -> str:
        head = (
            f"{self.model}: {self.method}, {self.optimizer}, {self.params / 1e9:.2f}B parameters "
            f"({self.trainable_params / 1e6:.1f}M trained), batch {self.batch_size} x {self.max_length} tokens, "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, {self.dtype}"
        )
        rows = [
            f"{'device':<7}{'modules':>8}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'needed':>9}{'budget':>9}"
        ]
        for d in self.devices:
            e, budget = d.estimate, "-" if d.budget is None else f"{d.budget / GB:.1f}"
            name = f"cuda:{d.device}" if d.is_gpu else d.device
            rows.append(
                f"{name:<7}{len(d.modules):>8}{e.weights / GB:>9.2f}{e.gradients / GB:>8.2f}{e.optimizer / GB:>8.2f}"
                f"{e.activations / GB:>8.2f}{d.needed / GB:>9.2f}{budget:>9}{'' if d.fits else '  over budget'}"
            )
        spans = "\n".join(f"  {name}: {span}" for name, span in _module_spans(self.device_map).items())
        strategies = "\n".join(
            f"  {name:<15}{need / GB:8.2f} GB per GPU{'' if need <= self.gpu_memory_gb * GB else '  (over the smallest GPU)'}"
            for name, need in self.per_gpu_by_strategy.items()
        )
        used = sum(1 for d in self.devices if d.is_gpu)
        verdict = (
            f"fits: yes, using {used} of {self.gpus} GPU(s)"
            if self.fits
            else "fits: NO" + (" (parts offloaded to CPU/disk: trains, but slowly)" if self.offloaded else "")
        )
        parts = [head, "model_parallel (device_map='auto'), GB:", "\n".join(rows), "device map:", spans]
        if strategies:
            parts += [
                "data-parallel strategies, each GPU (GB, weights+grads+optim+activations+CUDA context):",
                strategies,
            ]
        parts += [*(f"note: {n}" for n in self.notes), verdict]
        return "\n".join(parts)


def _module_spans(device_map: Mapping[str, Any]) -> dict[str, str]:
    """Device -> 'first .. last (n modules)', for a readable device map."""
    by_device: dict[str, list[str]] = {}
    for module, device in device_map.items():
        by_device.setdefault(_device_name(device), []).append(module or "(whole model)")
    return {
        dev: (mods[0] if len(mods) == 1 else f"{mods[0]} .. {mods[-1]} ({len(mods)} modules)")
        for dev, mods in by_device.items()
    }


def _device_name(device: Any) -> str:
    return str(device)


@contextmanager
def _quiet_accelerate():
    """infer_auto_device_map warns that the planned GPUs are absent; here that is the point."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _module_of(param_name: str, device_map: Mapping[str, Any]) -> str:
    """The device-map entry that holds a parameter (the longest module-path prefix)."""
    holders = [m for m in device_map if m == "" or param_name == m or param_name.startswith(m + ".")]
    best = max(holders, key=len, default=None)
    if best is None:
        raise PlanningError(f"parameter {param_name} is not in the device map")
    return best


def per_device_estimates(
    model, device_map: Mapping[str, Any], per_param: Mapping[str, MemoryEstimate], acts: ActivationModel
) -> dict[str, MemoryEstimate]:
    """Device -> memory, summing the parameters and the activations of the layers each device holds."""
    prefix = layer_prefix_of(model)
    out: dict[str, MemoryEstimate] = {}
    layers: dict[str, int] = {}
    for name, est in per_param.items():
        device = _device_name(device_map[_module_of(name, device_map)])
        out[device] = out.get(device, MemoryEstimate()) + est
    for device in device_map.values():
        out.setdefault(_device_name(device), MemoryEstimate())
    # Each decoder layer's holder: its own entry, or a parent's ("" when the whole model is on one device).
    for index in range(len(model.get_submodule(prefix))):
        device = _device_name(device_map[_module_of(f"{prefix}.{index}", device_map)])
        layers[device] = layers.get(device, 0) + 1
    head = _device_name(device_map[_module_of(head_param_name(model), device_map)])
    for device in out:
        out[device] = out[device] + MemoryEstimate(activations=acts.layers(layers.get(device, 0)))
    out[head] = out[head] + MemoryEstimate(gradients=gradient_in_flight(model, per_param), activations=acts.logits)
    return out


def parse_budget(value: Any) -> float:
    """'22GB', '512MiB', 24 (GB) or bytes -> bytes."""
    from accelerate.utils import convert_file_size_to_int

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise PlanningError(f"memory budget must be > 0, got {value}")
        return float(value) * GB if value < 10_000 else float(value)
    try:
        return float(convert_file_size_to_int(str(value)))
    except ValueError as e:
        raise PlanningError(f"cannot read memory budget {value!r}: use e.g. '22GB' or '512MiB'") from e


def _sorted_devices(names) -> list[str]:
    order = {"cpu": 1, "disk": 2}
    return sorted(names, key=lambda d: (order.get(d, 0), int(d) if d.isdigit() else 0))


def infer_device_map(
    model, max_memory: Mapping[Any, float], per_param: Mapping[str, MemoryEstimate], acts: ActivationModel
) -> dict[str, Any]:
    """accelerate's device map for training: the budgets shrink until weights, gradients, optimizer states and
    activations of every GPU fit (infer_auto_device_map itself only counts the weights)."""
    import torch
    from accelerate import infer_auto_device_map

    params = unique_parameters(model)
    weight_bytes = sum(p.numel() for p in params.values()) * 4
    training_bytes = sum(e.weights + e.gradients + e.optimizer for e in per_param.values())
    scale = training_bytes / weight_bytes  # accelerate sizes fp32 weights; we need all training state
    budgets = {k: float(v) for k, v in max_memory.items()}
    device_map: dict[str, Any] = {}
    for _ in range(12):
        sized = {
            k: max(0, int((v - (CUDA_CONTEXT_BYTES if isinstance(k, int) else 0)) / scale)) for k, v in budgets.items()
        }
        with _quiet_accelerate():
            device_map = infer_auto_device_map(
                model,
                max_memory=sized,
                no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
                dtype=torch.float32,
            )
        over = _overruns(model, device_map, per_param, acts, max_memory)
        if not over:
            break
        for device, excess in over.items():
            budgets[device] = max(0.0, budgets[device] - excess)
    return dict(device_map)


def _overruns(model, device_map, per_param, acts, max_memory) -> dict[Any, float]:
    """GPU -> bytes over budget (only GPUs: CPU offload is the fallback, not something to shrink)."""
    estimates = per_device_estimates(model, device_map, per_param, acts)
    over = {}
    for key, budget in max_memory.items():
        if isinstance(key, int) and str(key) in estimates:
            excess = estimates[str(key)].total + CUDA_CONTEXT_BYTES - budget
            if excess > 0:
                over[key] = excess
    return over


def strategy_per_gpu(
    per_param: Mapping[str, MemoryEstimate], acts: ActivationModel, n_layers: int, gpus: int, in_flight: float = 0.0
) -> dict[str, float]:
    """Bytes per GPU when every GPU runs the whole model (data parallel), with each sharding scheme.

    ``in_flight``: gradients not yet accumulated (:func:`gradient_in_flight`), whole on every GPU in each scheme.
    """
    total = MemoryEstimate()
    for est in per_param.values():
        total = total + est
    activations = acts.layers(n_layers) + acts.logits
    w, g, o = total.weights, total.gradients, total.optimizer
    largest_layer = w / max(n_layers, 1)  # FSDP/ZeRO-3 gathers about one layer (plus one prefetched)
    out = {
        "ddp": w + g + o,
        "zero1": w + g + o / gpus,
        "zero2": w + (g + o) / gpus,
        "fsdp / zero3": (w + g + o) / gpus + 2 * largest_layer,
    }
    return {k: v + activations + in_flight + CUDA_CONTEXT_BYTES for k, v in out.items()}


def plan_training(
    model: Any,
    *,
    gpus: int = 1,
    gpu_memory_gb: float = 24,
    method: str = "lora",
    batch_size: int = 1,
    max_length: int = 2048,
    gradient_checkpointing: bool = True,
    lora_r: int = LoRAConfig.r,
    lora_dropout: float = LoRAConfig.lora_dropout,
    lora_targets: str | list[str] | None = None,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    modules_to_save: list[str] | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    cpu_memory_gb: float = 64,
    trust_remote_code: bool = False,
) -> TrainingPlan:
    """Plans model-parallel placement and memory per device for training ``model``.

    Args:
        model: A transformers config, a registered alias, a local folder or a hub id (config only is read).
        gpus: Number of GPUs to plan for (they need not exist here).
        gpu_memory_gb: Memory of each GPU, used when ``max_memory`` is not given.
        method: full, lora or qlora.
        batch_size: Micro-batch size (rows per forward pass).
        max_length: Tokens per row.
        gradient_checkpointing: Recompute activations in backward.
        lora_r: Adapter rank (lora, qlora).
        lora_dropout: Adapter dropout (LoRAConfig's default); above 0 it keeps a copy of each adapted
            layer's input for backward.
        lora_targets: The adapted modules, as LoRAConfig's ``target_modules`` (names, or all-linear / None).
        dtype: What aift holds the weights and computes in: bf16 on CUDA GPUs (the default), fp32 on a CPU
            with mixed precision off.
        optimizer: TrainingConfig's optimizer, whose state is counted as it keeps it (aift.training.memory).
        modules_to_save: LoRAConfig's modules trained in full beside the adapters (lora, qlora), e.g.
            ``["embed_tokens", "lm_head"]``: each a trainable copy with its gradient and optimizer state.
        max_memory: Per-device budgets as accelerate takes them, e.g. ``{0: "22GB", 1: "22GB", "cpu": "64GB"}``.
        cpu_memory_gb: CPU RAM for offload when ``max_memory`` has no "cpu" entry.
        trust_remote_code: Allow configs whose model code lives on the hub.

    Returns:
        The plan; ``plan.fits`` says whether every GPU stays within budget with nothing offloaded.
    """
    if gpus < 1:
        raise PlanningError(f"gpus must be >= 1, got {gpus}")
    if batch_size < 1 or max_length < 1:
        raise PlanningError("batch_size and max_length must be >= 1")
    config = load_model_config(model, trust_remote_code)
    budgets = _budgets(max_memory, gpus, gpu_memory_gb, cpu_memory_gb)
    meta = empty_model(config)
    per_param = parameter_bytes(meta, method, lora_r, lora_targets, dtype, optimizer, modules_to_save)
    width = dropout_width(meta, method, lora_dropout, lora_targets)
    acts = activation_model(config, batch_size, max_length, gradient_checkpointing, dtype, width)
    device_map = infer_device_map(meta, budgets, per_param, acts)
    estimates = per_device_estimates(meta, device_map, per_param, acts)
    devices = [
        DevicePlan(
            dev,
            [m for m, d in device_map.items() if _device_name(d) == dev],
            estimates[dev],
            _budget_of(budgets, dev),
        )
        for dev in _sorted_devices(estimates)
    ]
    n_gpus = sum(1 for k in budgets if isinstance(k, int))
    n_layers = getattr(config, "num_hidden_layers", 1)
    plan = TrainingPlan(
        model=str(model) if not hasattr(model, "to_dict") else (config.name_or_path or config.model_type),
        method=method,
        optimizer=optimizer,
        gpus=n_gpus,
        gpu_memory_gb=min(v for k, v in budgets.items() if isinstance(k, int)) / GB,
        batch_size=batch_size,
        max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
        dtype=dtype,
        params=sum(p.numel() for p in unique_parameters(meta).values()),
        trainable_params=trainable_count(meta, method, lora_r, lora_targets, modules_to_save),
        device_map=device_map,
        devices=devices,
        per_gpu_by_strategy=(
            strategy_per_gpu(per_param, acts, n_layers, n_gpus, gradient_in_flight(meta, per_param))
            if n_gpus > 1
            else {}
        ),
    )
    plan.notes = _notes(plan)
    return plan


def _budgets(max_memory, gpus: int, gpu_memory_gb: float, cpu_memory_gb: float) -> dict[Any, float]:
    if max_memory:
        budgets = {_device_key(k): parse_budget(v) for k, v in max_memory.items()}
    else:
        if gpu_memory_gb <= 0:
            raise PlanningError(f"gpu_memory_gb must be > 0, got {gpu_memory_gb}")
        budgets = {i: gpu_memory_gb * GB for i in range(gpus)}
    budgets.setdefault("cpu", parse_budget(cpu_memory_gb))
    if not any(isinstance(k, int) for k in budgets):
        raise PlanningError("max_memory names no GPU: give budgets like {0: '22GB', 1: '22GB'}")
    return budgets


def _device_key(key: Any) -> Any:
    """0, '0', 'cuda:0' -> 0; 'cpu', 'disk' stay."""
    text = str(key).removeprefix("cuda:")
    if text.isdigit():
        return int(text)
    if text in ("cpu", "disk"):
        return text
    raise PlanningError(f"unknown device {key!r} in max_memory: use GPU indices (0, 1, ...), 'cpu' or 'disk'")


def _budget_of(budgets: Mapping[Any, float], device: str) -> float | None:
    key = int(device) if device.isdigit() else device
    return budgets.get(key)


def _notes(plan: TrainingPlan) -> list[str]:
    notes = []
    on = {d.device for d in plan.devices}
    if "cpu" in on or "disk" in on:
        notes.append(
            "some modules do not fit on the GPUs and go to "
            + " and ".join(sorted(on & {"cpu", "disk"}))
            + ": training runs but each step moves them over PCIe (give more GPUs or memory, or use qlora)"
        )
    if plan.method == "full" and plan.gpus > 1:
        notes.append("full fine-tuning across GPUs usually fits better with fsdp or deepspeed zero3 (table above)")
    if not plan.gradient_checkpointing:
        notes.append("gradient checkpointing is off: activations grow with every layer")
    return notes
