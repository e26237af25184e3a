"""Device helpers: correct, and silent, on a machine without a GPU."""

from __future__ import annotations

import functools
import gc
import logging
from pathlib import Path

import torch

from aift.units import to_gb

log = logging.getLogger(__name__)


def get_available_device() -> str:
    """'cuda' when a CUDA GPU is usable, then 'mps', else 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def get_gpu_memory_info() -> dict:
    """Per-GPU memory in decimal GB (aift.units): {'available', 'device_count', 'devices': [{index, name, total_gb, ...}]}."""
    if not torch.cuda.is_available():
        return {"available": False, "device_count": 0, "devices": []}
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        devices.append(
            {
                "index": i,
                "name": props.name,
                "total_gb": to_gb(total),
                "allocated_gb": to_gb(torch.cuda.memory_allocated(i)),
                "reserved_gb": to_gb(torch.cuda.memory_reserved(i)),
                "free_gb": to_gb(free),
                "multi_processor_count": props.multi_processor_count,
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return {"available": True, "device_count": len(devices), "devices": devices}


def supports_bf16(device: str) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA GPUs of compute capability 8.0+, and CPUs with
    AVX512-BF16 or AMX (cpu_has_native_bf16). Elsewhere bf16 is emulated or missing, and fp32 is faster.

    The one precision rule: training's autocast (training.backends.resolve_precision) and the dtype models
    load in (models.loading.default_dtype) both ask it.
    """
    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_has_native_bf16()
    return False


def optimize_model_for_gpu(
    model, device: str | None = None, enable_mixed_precision: bool = True, gradient_checkpointing: bool = False
):
    """Moves a model to the device, in bf16/fp16 on CUDA when mixed precision is on; returns it."""
    device = device or get_available_device()
    if device.startswith("cuda") and enable_mixed_precision:
        model = model.to(dtype=torch.bfloat16 if supports_bf16(device) else torch.float16)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model.to(device)
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        enable_activation_checkpointing(model)
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False
    return model


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs; what torch recommends).

    transformers 5 renamed ``gradient_checkpointing_enable`` (the old name now warns on every call) to
    ``activation_checkpointing_enable``; the releases before the rename only have the old name.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def clear_gpu_memory() -> None:
    """Frees Python garbage and, on CUDA, the caching allocator's unused blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), as oneDNN reports it.

    Without it (an AVX2-only CPU) PyTorch emulates bf16 matmuls, measured here at about 1/60 of the fp32 speed:
    bf16 autocast then costs time instead of saving it.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: read the CPU's flags instead
        try:
            flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags


def set_memory_fraction(fraction: float = 0.9) -> None:
    """Caps this process's share of each GPU's memory; a no-op without CUDA."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(fraction, i)


def peak_memory_gb(device: str | None = None) -> float:
    """Peak memory of this process in decimal GB (aift.units): max allocated on CUDA, else peak resident set size.

    device: where the process computes; None: CUDA when there is a GPU, else the CPU.

    The one definition of the figure logged as ``peak_mem_gb`` (training logs, summaries, benchmarks).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return to_gb(torch.cuda.max_memory_allocated())
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return to_gb(peak * (1 if sys.platform == "darwin" else 1024))
