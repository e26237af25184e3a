"""aift, the AI Fine-tuning Toolkit: full, LoRA and QLoRA fine-tuning (SFT, then DPO/ORPO/SimPO/KTO) of LLMs, Japanese models first.

The public API is imported lazily so that ``import aift`` (and ``aift --help``) stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aift.utils.library_noise import install_filters

install_filters()  # before any aift module imports the libraries that print them (see aift.utils.library_noise)

try:
    __version__ = version("aift")  # pyproject.toml's, the one place the version is written
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown (not installed)"

_EXPORTS = {
    "JapaneseModel": "aift.inference.japanese",
    "BaseModel": "aift.inference.japanese",
    "SUPPORTED_MODELS": "aift.models.registry",
    "EMBEDDED_MODEL": "aift.models.registry",
    "ModelNotAvailableError": "aift.models.loading",
    "TrainingConfig": "aift.config",
    "LoRAConfig": "aift.config",
    "MultiGPUTrainingConfig": "aift.config",
    "PreferenceConfig": "aift.training.objectives.pairs",
    "ConfigError": "aift.config",
    "AiftError": "aift.errors",
    "TextDataset": "aift.data.text_dataset",
    "FullFinetuningTrainer": "aift.training.trainers",
    "LoRAFinetuningTrainer": "aift.training.trainers",
    "AdvancedMultiGPUTrainer": "aift.distributed.trainer",
    "PreferenceTrainer": "aift.training.preference",
    "GRPOTrainer": "aift.training.grpo_trainer",
    "GRPOConfig": "aift.training.grpo_config",
    "QuantizationOptimizer": "aift.quant.optimizer",
    "get_available_device": "aift.utils.gpu",
    "get_gpu_memory_info": "aift.utils.gpu",
    "optimize_model_for_gpu": "aift.utils.gpu",
    "clear_gpu_memory": "aift.utils.gpu",
    "set_memory_fraction": "aift.utils.gpu",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aift' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
