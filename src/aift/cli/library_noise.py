"""Filters for a few known messages of libraries that tell an aift user nothing, installed by the CLI.

Each entry names the library's logger (or warning) and the start of the one message, with the reason it is
noise for someone running `aift`. Everything else those libraries say still reaches the terminal.
"""

from __future__ import annotations

import logging
import warnings

# logger name -> starts of messages dropped from it.
LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # Logged at import (peft imports bitsandbytes for every LoRA run, quantized or not): an optional CPU kernel
    # that bitsandbytes would download from the Hugging Face hub with the `kernels` package. 4-bit works without.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Logged at import on every machine without CUDA; aift's own "training ..." line names the device it uses.
    "DeepSpeed": ("Setting accelerator to CPU",),
}

# transformers deprecated these names in favour of activation_checkpointing_*; aift calls the new one, but peft
# still reads model.is_gradient_checkpointing and QLoRA's prepare_model_for_kbit_training calls the old enable.
DEPRECATION_WARNINGS = r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def install_filters() -> None:
    """Drops the known messages above; safe to call more than once."""
    for name, starts in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
    warnings.filterwarnings("ignore", message=DEPRECATION_WARNINGS, category=FutureWarning, module="transformers")
