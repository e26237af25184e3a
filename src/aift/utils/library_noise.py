"""Filters for a few known messages of libraries that tell an aift user nothing.

``import aift`` installs them (so the Python API's first screen is as quiet as the CLI's), and the CLI installs
them again before each command (pytest and ``warnings.catch_warnings`` reset the warning filters in between).
They are logging filters on the named loggers and one narrow warning filter; nothing upstream is patched.

Each entry names the library's logger (or warning) and the start of the one message, with the reason it is
noise for someone using aift. Everything else those libraries say still reaches the terminal.
"""

from __future__ import annotations

import logging
import warnings

# logger name -> starts of messages dropped from it.
LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # Logged at import (peft imports bitsandbytes for every LoRA run, quantized or not): an optional CPU kernel
    # that bitsandbytes would download from the Hugging Face hub with the `kernels` package. 4-bit works without.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Logged on every machine without CUDA when deepspeed is first imported, which is not only for
    # strategy=deepspeed: accelerate's unwrap in every save_pretrained imports it when it is installed (the first
    # use of the embedded model converts and saves it). aift's own "training ..." line names the device it uses.
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
