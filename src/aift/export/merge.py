"""Folding a LoRA adapter into its base model: one plain safetensors folder any tool can load.

    merge_adapter("runs/ja-lora/final", "runs/ja-merged", dtype="bf16")

A QLoRA adapter is merged into the base loaded in the requested dtype (the full-precision weights,
not the 4-bit ones it was trained against), as PEFT's merge_and_unload does for a non-quantized base.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aift.export.folders import adapter_base, atomic_dir, load_folder_tokenizer, read_meta, torch_dtype, write_meta

log = logging.getLogger(__name__)


def load_merged(adapter_dir: str | Path, base: str | None = None, dtype: str = "fp32", device: str = "cpu"):
    """Base plus adapter merged in memory -> (model, tokenizer, meta). The base's own name when `base` is None."""
    from peft import PeftModel

    from aift.models.loading import load_causal_lm

    adapter_dir = Path(adapter_dir)
    base = base or adapter_base(adapter_dir)
    meta = read_meta(adapter_dir)
    if meta.get("method") == "qlora":
        log.info("QLoRA adapter: merging into %s loaded in %s (not 4-bit)", base, dtype)
    tokenizer = load_folder_tokenizer(adapter_dir, base)
    model = load_causal_lm(base, device=device, dtype=torch_dtype(dtype))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # tokens added during training
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval(), tokenizer, {**meta, "base_model": base}


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base: str | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
) -> Path:
    """Merges a LoRA adapter into its base and saves a safetensors model folder with the tokenizer.

    Args:
        adapter_dir: Folder with adapter_config.json and adapter weights (e.g. a training run's final/).
        output_dir: Folder to write (atomically: a temp folder renamed into place).
        base: The base model; default: the one the adapter names (aift_meta.json, adapter_config.json).
        dtype: bf16, fp16 or fp32: the dtype of the base the adapter is merged into, and of the saved weights.
        overwrite: Replace a non-empty output_dir.

    Returns:
        The output folder. Its aift_meta.json keeps the adapter's prompt_format for generate/chat/export.
    """
    model, tokenizer, meta = load_merged(adapter_dir, base, dtype)
    with atomic_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(
            tmp,
            {
                "base_model": meta["base_model"],
                "method": "merged",
                "merged_from": {"adapter": str(adapter_dir), "method": meta.get("method", "lora")},
                "prompt_format": meta.get("prompt_format"),
                "max_length": meta.get("max_length"),
                "dtype": dtype,
            },
        )
    log.info("merged %s into %s -> %s (%s)", adapter_dir, meta["base_model"], output_dir, dtype)
    return Path(output_dir)


def save_plain_folder(
    model_name: str, output_dir: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """`aift export --format safetensors` for a full model: a plain HF folder (weights, config, tokenizer, meta)."""
    from aift.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(model_name)
    model = load_causal_lm(model_name, dtype=torch_dtype(dtype) if dtype else None)
    if getattr(model, "quantization_config", None) is not None or getattr(model, "is_quantized", False):
        from aift.errors import AiftError

        raise AiftError(f"{model_name} is bitsandbytes-quantized; export the unquantized model instead")
    tokenizer = load_tokenizer(model_name)
    with atomic_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = read_meta(path) if Path(path).is_dir() else {}
        write_meta(tmp, {**meta, "exported_from": str(model_name), "dtype": dtype or str(model.dtype)})
    return Path(output_dir)
