"""Folding a LoRA adapter into its base model: one plain safetensors folder any tool can load.

    merge_adapter("runs/ja-lora/final", "runs/ja-merged", dtype="bf16")

Which base weights the adapter is added to (`base_weights`):

- "original" (default): the base loaded in the requested dtype, as PEFT's merge_and_unload does for a
  non-quantized base. For a QLoRA adapter this is W + BA, close to but not what was trained.
- "dequantized": for a QLoRA adapter, the base is quantized exactly as training quantized it (bits, NF4/FP4,
  double quantization, read from the run) and each quantized Linear is dequantized to a plain one, so the
  merged model computes dequant(quant(W)) + BA: the function the adapter was trained with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from aift.errors import AiftError
from aift.export.folders import atomic_dir, torch_dtype
from aift.models.run_folder import (
    CONFIG_FILE,
    RunTarget,
    adapter_base,
    adapter_folder,
    attach_adapter,
    load_run_tokenizer,
    read_meta,
    write_meta,
)

log = logging.getLogger(__name__)

BASE_WEIGHTS = ("original", "dequantized")


@dataclass(frozen=True)
class QuantSettings:
    """How a QLoRA run quantized its base (defaults: what aift's QLoRA does, see models.loading.bnb_config)."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    load_dtype: str | None = None  # dtype the base was loaded in before quantizing; None: the device's default
    source: str = "aift's QLoRA defaults"

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(self.compute_dtype),
        )

    def describe(self) -> str:
        if self.bits == 8:
            return f"8-bit LLM.int8 (from {self.source})"
        dq = "double quant" if self.double_quant else "no double quant"
        return f"4-bit {self.quant_type}, {dq}, compute {self.compute_dtype} (from {self.source})"


def quant_settings(adapter_dir: str | Path, meta: dict | None = None) -> QuantSettings:
    """The quantization a QLoRA adapter was trained against.

    Read from aift_meta.json's "quantization" block when present, else from the run's config.yaml (the folder
    above final/: LoRAConfig.qlora_4bit), else aift's QLoRA defaults (4-bit NF4, double quantization).
    Raises AiftError for an adapter that aift trained on a full-precision base (method lora).
    """
    adapter_dir = Path(adapter_dir)
    meta = read_meta(adapter_dir) if meta is None else meta
    block = meta.get("quantization")
    if isinstance(block, dict):
        return _settings_from_meta(block, adapter_dir)
    if meta.get("method") not in (None, "qlora"):
        raise AiftError(
            f"{adapter_dir} was trained with method {meta['method']!r} on a full-precision base: there are no "
            "quantized weights to reproduce; use base_weights='original'"
        )
    lora_section = _run_lora_config(adapter_dir)
    if lora_section is not None:
        if not lora_section.get("use_qlora", False):
            raise AiftError(f"{adapter_dir.parent / CONFIG_FILE} says use_qlora: false; use base_weights='original'")
        bits = 4 if lora_section.get("qlora_4bit", True) else 8
        return QuantSettings(bits=bits, source=str(adapter_dir.parent / CONFIG_FILE))
    log.warning(
        "%s records no quantization settings: assuming aift's QLoRA defaults (4-bit NF4, double quant)", adapter_dir
    )
    return QuantSettings()


def _settings_from_meta(block: dict, adapter_dir: Path) -> QuantSettings:
    where = adapter_dir / "aift_meta.json"
    bits = block.get("bits", 4)
    quant_type = block.get("quant_type", "nf4")
    if bits not in (4, 8) or quant_type not in ("nf4", "fp4"):
        raise AiftError(f"{where}: quantization needs bits 4 or 8 and quant_type nf4 or fp4, got {block}")
    return QuantSettings(
        bits=bits,
        quant_type=quant_type,
        double_quant=bool(block.get("double_quant", True)),
        compute_dtype=block.get("compute_dtype", "bf16"),
        load_dtype=block.get("dtype"),
        source=str(where),
    )


def _run_lora_config(adapter_dir: Path) -> dict | None:
    """The LoRAConfig section of the training run's config.yaml (adapter_dir is RUN/final), or None."""
    from aift.config import load_yaml

    path = adapter_dir.parent / CONFIG_FILE
    if not path.is_file():
        return None
    section = load_yaml(path).get("LoRAConfig")
    return section if isinstance(section, dict) else None


def load_dequantized_base(base: str, settings: QuantSettings, device: str = "cpu"):
    """The base quantized as training did, each quantized Linear then turned back into a plain fp32 nn.Linear."""
    import torch
    from transformers import AutoModelForCausalLM

    from aift.models.loading import default_dtype, explain_load_failure, resolve_model_path

    load_dtype = torch_dtype(settings.load_dtype) if settings.load_dtype else default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(base),
            dtype=load_dtype,
            quantization_config=settings.bnb_config(),
            device_map={"": device},
        )
    except (OSError, ValueError) as e:
        raise explain_load_failure(base, e) from e
    # transformers' public dequantize(): bitsandbytes' dequantize_4bit / int8 dequant per Linear, then drops
    # quantization_config. fp32 so that adding BA loses nothing before the final cast.
    model = model.dequantize(dtype=torch.float32)
    return model.to(torch.float32)


def load_merged(
    adapter_dir: str | Path,
    base: str | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    base_weights: str = "original",
):
    """Base plus adapter merged in memory -> (model, tokenizer, meta). The base's own name when `base` is None.

    adapter_dir may be the run dir (its final/ is used). base_weights: "original" (the base in `dtype`) or
    "dequantized" (the QLoRA base as trained; see the module doc).
    """
    from aift.models.loading import load_causal_lm

    if base_weights not in BASE_WEIGHTS:
        raise AiftError(f"base_weights must be one of {', '.join(BASE_WEIGHTS)}; got {base_weights!r}")
    adapter_dir = adapter_folder(adapter_dir)
    target = RunTarget(base=base or adapter_base(adapter_dir), adapter=str(adapter_dir))
    meta = target.meta
    tokenizer = load_run_tokenizer(target)
    if base_weights == "dequantized":
        settings = quant_settings(adapter_dir, meta)
        log.info("merging into the dequantized base: %s quantized as in training, %s", target.base, settings.describe())
        model = load_dequantized_base(target.base, settings, device)
    else:
        _log_original(target.base, dtype, meta)
        model = load_causal_lm(target.base, device=device, dtype=torch_dtype(dtype))
    model = attach_adapter(model, tokenizer, adapter_dir, merge=True).to(torch_dtype(dtype))
    return model.eval(), tokenizer, {**meta, "base_model": target.base, "base_weights": base_weights}


def _log_original(base: str, dtype: str, meta: dict) -> None:
    if meta.get("method") == "qlora" or "quantization" in meta:
        log.info(
            "QLoRA adapter: merging into the original %s weights in %s (W + BA). The adapter was trained against "
            "the quantized base; base_weights='dequantized' (--base-weights dequantized) reproduces the trained "
            "model exactly",
            base,
            dtype,
        )
    else:
        log.info("merging into the original %s weights in %s", base, dtype)


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base: str | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    base_weights: str = "original",
) -> Path:
    """Merges a LoRA adapter into its base and saves a safetensors model folder with the tokenizer.

    Args:
        adapter_dir: Folder with adapter_config.json and adapter weights (a training run's final/, or the run dir).
        output_dir: Folder to write (atomically: a temp folder renamed into place).
        base: The base model; default: the one the adapter names (aift_meta.json, adapter_config.json).
        dtype: bf16, fp16 or fp32: the saved weights' dtype; with "original" also the dtype the merge happens in
            ("dequantized" merges in fp32, then casts).
        overwrite: Replace a non-empty output_dir.
        base_weights: "original" (the base's own weights in `dtype`: W + BA) or "dequantized" (for a QLoRA
            adapter: the base quantized as in training, then dequantized: dequant(quant(W)) + BA, the trained model).

    Returns:
        The output folder. Its aift_meta.json keeps the adapter's prompt_format for generate/chat/export.
    """
    model, tokenizer, meta = load_merged(adapter_dir, base, dtype, base_weights=base_weights)
    save_merged(model, tokenizer, meta, adapter_dir, output_dir, dtype, overwrite, base_weights)
    return Path(output_dir)


def save_merged(
    model, tokenizer, meta: dict, adapter_dir, output_dir, dtype: str, overwrite: bool = False, base_weights="original"
) -> None:
    """Writes a merged model folder (weights, tokenizer, aift_meta.json naming the adapter) atomically."""
    with atomic_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(
            tmp,
            {
                "base_model": meta["base_model"],
                "method": "merged",
                "merged_from": {
                    "adapter": str(adapter_dir),
                    "method": meta.get("method", "lora"),
                    "base_weights": base_weights,
                },
                "prompt_format": meta.get("prompt_format"),
                "max_length": meta.get("max_length"),
                "dtype": dtype,
            },
        )
    log.info(
        "merged %s into %s (%s weights) -> %s (%s)", adapter_dir, meta["base_model"], base_weights, output_dir, dtype
    )


def save_plain_folder(
    model_name: str, output_dir: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """`aift export --format safetensors` for a full model: a plain HF folder (weights, config, tokenizer, meta)."""
    from aift.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(model_name)
    model = load_causal_lm(model_name, dtype=torch_dtype(dtype) if dtype else None)
    if getattr(model, "quantization_config", None) is not None or getattr(model, "is_quantized", False):
        raise AiftError(f"{model_name} is bitsandbytes-quantized; export the unquantized model instead")
    tokenizer = load_tokenizer(model_name)
    with atomic_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = read_meta(path) if Path(path).is_dir() else {}
        write_meta(tmp, {**meta, "exported_from": str(model_name), "dtype": dtype or str(model.dtype)})
    return Path(output_dir)
