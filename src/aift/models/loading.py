"""Turning a model name into a folder, a tokenizer and a model, with one clear error when it cannot be had."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from aift.errors import AiftError
from aift.models.embedded import embedded_model_dir
from aift.models.registry import EMBEDDED_MODEL, get_spec

log = logging.getLogger(__name__)


class ModelNotAvailableError(AiftError, RuntimeError):
    """A model cannot be loaded; the message says why and what to do."""


class RemoteCodeRequiredError(ModelNotAvailableError):
    """The model needs trust_remote_code=True and the user did not ask for it."""


def resolve_model_path(name: str | Path) -> str:
    """A registry alias, a local folder or a Hugging Face id -> something from_pretrained accepts."""
    name = str(name)
    if name.lower() in (EMBEDDED_MODEL, "smollm2", "default", "HuggingFaceTB/SmolLM2-135M-Instruct".lower()):
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is not a model folder (no config.json in it)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"model folder {name} does not exist")
    return _hub_or_cache(name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect (a quick check instead of minutes of retries)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_or_cache(repo_id: str) -> str:
    """The hub id when the hub answers; else its snapshot in the local cache; else a clear error."""
    if hub_reachable():
        return repo_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
        raise explain_load_failure(repo_id, e) from e


def check_trust_remote_code(name: str, trust_remote_code: bool) -> None:
    """Refuses registered remote-code models unless the user opted in."""
    spec = get_spec(name)
    if spec and spec.trust_remote_code and not trust_remote_code:
        raise RemoteCodeRequiredError(
            f"{name} runs code from its hub repository (its card loads it with trust_remote_code=True). "
            "aift loads it only when you ask: pass --trust-remote-code (or trust_remote_code=True)."
        )


def explain_load_failure(name: str, error: BaseException) -> ModelNotAvailableError:
    """One message for a model that cannot be had: which model, gated or not, what to do."""
    spec = get_spec(name)
    gated = spec.gated if spec else None
    text = f"{type(error).__name__}: {error}"
    gated_hint = (
        "It is gated: accept its licence on its hub page and set HF_TOKEN (or run `aift login`). "
        if gated
        else ("It is not gated. " if gated is False else "")
    )
    reason = "it is not in the local Hugging Face cache and the hub cannot be reached"
    lowered = text.lower()
    if "401" in text or "gated" in lowered or "restricted" in lowered:
        reason = "the hub refused access (gated model or missing token)"
    elif "404" in text or "repository not found" in lowered or "not a valid model identifier" in lowered:
        reason = "no such repository on the hub"
    return ModelNotAvailableError(
        f"cannot load model {name!r}: {reason}. {gated_hint}"
        "Check the network (or pre-download it into the Hugging Face cache), pass a local folder, "
        f"or pick one from `aift models` (the embedded {EMBEDDED_MODEL!r} always works)."
    )


_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ConnectionError, TimeoutError)


def load_tokenizer(name: str, trust_remote_code: bool = False, **kwargs: Any):
    """Loads a tokenizer and makes sure it has a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    check_trust_remote_code(name, trust_remote_code)
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except _LOAD_ERRORS as e:
        raise explain_load_failure(name, e) from e
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Batches need a pad token; a tokenizer without one pads with EOS (or UNK). Returns the tokenizer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def pick_attention(use_flash_attention: bool, device: str) -> str:
    """flash_attention_2 where installed and on CUDA, else SDPA."""
    import importlib.util

    if use_flash_attention and device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def default_dtype(device: str):
    """The dtype weights load in: bf16 where the device computes it in hardware (utils.gpu.supports_bf16),
    fp16 on older CUDA GPUs, else fp32 (an AVX2-only CPU, MPS)."""
    import torch

    from aift.utils.gpu import supports_bf16  # here, not at the top: this module imports without torch

    if supports_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.startswith("cuda") else torch.float32


def bnb_config(
    load_in_8bit: bool, load_in_4bit: bool, compute_dtype=None, quant_type: str = "nf4", double_quant: bool = True
):
    """A BitsAndBytesConfig for 8- or 4-bit loading, or None."""
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of load_in_8bit and load_in_4bit")
    import torch
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


def load_causal_lm(
    name: str,
    *,
    device: str = "cpu",
    dtype=None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    use_flash_attention: bool = True,
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
):
    """Loads a causal LM by name onto a device (or a device_map), optionally quantized with bitsandbytes."""
    from transformers import AutoModelForCausalLM

    check_trust_remote_code(name, trust_remote_code)
    path = resolve_model_path(name)
    quant = bnb_config(load_in_8bit, load_in_4bit, compute_dtype=dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype or default_dtype(device),
        "attn_implementation": pick_attention(use_flash_attention, device),
        "trust_remote_code": trust_remote_code,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map or {"": device}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory:
        kwargs["max_memory"] = max_memory
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    log.info("loading %s (attention: %s)", name, kwargs["attn_implementation"])
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except _LOAD_ERRORS as e:
        raise explain_load_failure(name, e) from e
    if "device_map" not in kwargs:
        model.to(device)
    return model


def eval_mode(model):
    """model.eval(), except that bitsandbytes' 4-bit linear layers stay in train mode; returns the model.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference on the first eval-mode forward
    without gradients, for good, and the repacked path (gemv_4bit) has no backward: a QLoRA run that evaluates
    before or during training would then train with no gradient through the frozen base layers. A 4-bit linear
    layer has no dropout or running statistics, so its train mode changes nothing else in eval.
    """
    model.eval()
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return model
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.train()
    return model
