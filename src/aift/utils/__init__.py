"""Device and process helpers."""

from aift.utils.gpu import (
    clear_gpu_memory,
    get_available_device,
    get_gpu_memory_info,
    optimize_model_for_gpu,
    set_memory_fraction,
)

__all__ = [
    "clear_gpu_memory",
    "get_available_device",
    "get_gpu_memory_info",
    "optimize_model_for_gpu",
    "set_memory_fraction",
]
