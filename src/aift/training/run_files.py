"""A run folder's own files as the loop writes them: the output-dir check, final/, and the run's description.

Split from :mod:`aift.training.loop` so that the loop reads as its steps; the file names are
:mod:`aift.models.run_folder`'s.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from aift.config import LoRAConfig, TrainingConfig
from aift.errors import AiftError
from aift.models import run_folder
from aift.models.run_folder import write_meta
from aift.training import checkpoint as ckpt

# Files and folders that mark an output dir as holding a run.
RUN_MARKERS = (
    run_folder.CONFIG_FILE,
    run_folder.METRICS_FILE,
    run_folder.SUMMARY_FILE,
    run_folder.CHECKPOINTS_DIR,
    run_folder.FINAL_DIR,
    run_folder.TENSORBOARD_DIR,
)


class OutputDirError(AiftError, ValueError):
    """The output dir holds another run."""


@dataclass
class RunInfo:
    """What the trainer knows about the run beyond TrainingConfig."""

    method: str  # full | lora | qlora
    model_name: str
    prompt_format: str | None = None
    lora_config: LoRAConfig | None = None


def prepare_output_dir(output_dir: Path, config: TrainingConfig, resuming: bool) -> None:
    """Refuses to mix two runs in one folder; with overwrite_output_dir, removes the old run's files."""
    existing = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    if existing and not resuming:
        if not config.overwrite_output_dir:
            raise OutputDirError(
                f"{output_dir} holds another run ({', '.join(existing)}): choose another output_dir, resume it "
                "with resume_from_checkpoint=latest, or pass overwrite_output_dir=true to replace it"
            )
        for name in existing:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / run_folder.SUMMARY_FILE).unlink(missing_ok=True)


def save_final(
    model: torch.nn.Module, tokenizer, final_dir: Path, info: RunInfo, max_length: int, state_dict: dict | None = None
) -> None:
    """final/: the adapter (LoRA) or the full model, the tokenizer and aift_meta.json, written atomically."""
    tmp = final_dir.with_name(".tmp-final")
    with ckpt.writing_folder(tmp, final_dir):
        _write_final(model, tokenizer, tmp, final_dir, info, max_length, state_dict)


def _write_final(model, tokenizer, tmp: Path, final_dir: Path, info: RunInfo, max_length: int, state_dict) -> None:
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(tmp)
    meta = {
        "base_model": info.model_name,
        "method": info.method,
        "prompt_format": info.prompt_format,
        "max_length": max_length,
    }
    quantization = quantization_meta(model)
    if quantization is not None:  # QLoRA: what `aift merge --base-weights dequantized` must reproduce
        meta["quantization"] = quantization
    write_meta(tmp, meta)
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)


def quantization_meta(model: torch.nn.Module) -> dict | None:
    """How bitsandbytes quantized the (frozen) base, as aift_meta.json records it; None for a plain base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        return None
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if config.get("load_in_8bit"):
        return {"bits": 8}
    if not config.get("load_in_4bit"):
        return None
    dtype_names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    compute = str(config.get("bnb_4bit_compute_dtype", "bfloat16")).removeprefix("torch.")
    return {
        "bits": 4,
        "quant_type": config.get("bnb_4bit_quant_type", "nf4"),
        "double_quant": bool(config.get("bnb_4bit_use_double_quant", False)),
        "compute_dtype": dtype_names.get(compute, compute),
    }


def flat_config(config: TrainingConfig, info: RunInfo) -> dict[str, Any]:
    flat = asdict(config)
    if info.lora_config is not None:
        flat.update({f"lora_{k}": v for k, v in asdict(info.lora_config).items()})
    return flat
