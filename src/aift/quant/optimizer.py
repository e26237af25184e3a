"""`QuantizationOptimizer`: 8-bit and 4-bit bitsandbytes copies of a model, saved so they load again, and
a benchmark that puts the speed and memory gained beside the quality lost.

    opt = QuantizationOptimizer("smollm2-135m-instruct")
    q4 = opt.quantize_to_4bit("out/q4")
    report = opt.benchmark_quantization(opt.load_original(), q4, ["日本の首都は東京です。"], num_runs=20)
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from aift.data.packing import IGNORE_INDEX
from aift.errors import NotAvailableError
from aift.export.folders import atomic_dir, folder_size
from aift.inference.generation import SamplingParams, generate_batch
from aift.models.run_folder import read_meta, write_meta

log = logging.getLogger(__name__)


def _require_bitsandbytes() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise NotAvailableError("quantization needs bitsandbytes: pip install 'aift[quant]' (or bitsandbytes)")


class QuantizationOptimizer:
    """Quantizes one model with bitsandbytes and measures what it costs.

    Args:
        model_name_or_path: Registry alias, local folder or hub id.
        device: cpu, cuda, ...; default: the best available.
    """

    def __init__(self, model_name_or_path: str, device: str | None = None):
        from aift.utils.gpu import get_available_device

        self.model_name_or_path = str(model_name_or_path)
        self.device = device or get_available_device()
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from aift.models.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_name_or_path)
        return self._tokenizer

    def _compute_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        if compute_dtype == torch.float16 and not self.device.startswith("cuda"):
            log.info("note: float16 compute is slow or unsupported on %s; using bfloat16 instead", self.device)
            return torch.bfloat16
        return compute_dtype

    def load_original(self, dtype: torch.dtype | None = None):
        """The unquantized model (fp32 on CPU) for comparison."""
        from aift.models.loading import load_causal_lm

        return load_causal_lm(self.model_name_or_path, device=self.device, dtype=dtype).eval()

    def quantize_to_8bit(
        self,
        output_dir: str | Path,
        compute_dtype: torch.dtype = torch.float16,
        llm_int8_threshold: float = 6.0,
        llm_int8_has_fp16_weight: bool = False,
        llm_int8_enable_fp32_cpu_offload: bool = False,
    ):
        """LLM.int8() quantization; saves a folder that from_pretrained / JapaneseModel load again.

        Returns:
            The quantized model, loaded back from output_dir.
        """
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=llm_int8_threshold,
            llm_int8_has_fp16_weight=llm_int8_has_fp16_weight,
            llm_int8_enable_fp32_cpu_offload=llm_int8_enable_fp32_cpu_offload,
        )
        return self._quantize(output_dir, config, self._compute_dtype(compute_dtype), {"bits": 8})

    def quantize_to_4bit(
        self,
        output_dir: str | Path,
        compute_dtype: torch.dtype = torch.float16,
        quant_type: str = "nf4",
        use_double_quant: bool = True,
    ):
        """4-bit (NF4 or FP4) quantization; saves a folder that from_pretrained / JapaneseModel load again.

        Returns:
            The quantized model, loaded back from output_dir.
        """
        from transformers import BitsAndBytesConfig

        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, not {quant_type!r}")
        dtype = self._compute_dtype(compute_dtype)
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=use_double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        return self._quantize(output_dir, config, dtype, {"bits": 4, "quant_type": quant_type})

    def _quantize(self, output_dir: str | Path, config, dtype: torch.dtype, info: dict):
        from transformers import AutoModelForCausalLM

        from aift.models.loading import resolve_model_path

        _require_bitsandbytes()
        path = resolve_model_path(self.model_name_or_path)
        placement = {"": self.device}
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=dtype, device_map=placement
        )
        with atomic_dir(output_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            meta = read_meta(path) if Path(path).is_dir() else {}
            write_meta(tmp, {**meta, "quantized_from": self.model_name_or_path, **info, "compute_dtype": str(dtype)})
        del model
        # Loading the saved folder back is the proof that it can be loaded.
        return AutoModelForCausalLM.from_pretrained(output_dir, device_map=placement).eval()

    # ------------------------------------------------------------------------------------------ benchmark

    def _encode(self, test_inputs: Any) -> dict[str, torch.Tensor]:
        if isinstance(test_inputs, str):
            test_inputs = [test_inputs]
        if isinstance(test_inputs, torch.Tensor):
            ids = test_inputs if test_inputs.dim() == 2 else test_inputs.unsqueeze(0)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if isinstance(test_inputs, dict) or hasattr(test_inputs, "keys"):
            return {k: v for k, v in test_inputs.items() if k in ("input_ids", "attention_mask")}
        return dict(self.tokenizer(list(test_inputs), return_tensors="pt", padding=True))

    def benchmark_quantization(self, original_model, quantized_model, test_inputs, num_runs: int = 100) -> dict:
        """Speed, memory, size and quality of a quantized model beside its original.

        Args:
            original_model: The unquantized model.
            quantized_model: The quantized one (e.g. from quantize_to_4bit).
            test_inputs: Texts, a tensor of token ids, or a tokenizer output.
            num_runs: Timed forward passes per model (after one warm-up).

        Returns:
            {"original": {...}, "quantized": {...}, "size_ratio", "memory_ratio", "kl_divergence", "speedup"}, where
            each model has latency_ms_mean/p50/p95, generation_tokens_per_s, memory_bytes, disk_bytes, perplexity.
        """
        batch = self._encode(test_inputs)
        report = {}
        logits = {}
        for label, model in (("original", original_model), ("quantized", quantized_model)):
            inputs = {k: v.to(model.device) for k, v in batch.items()}
            stats, logits[label] = _measure(model, inputs, num_runs, self.tokenizer.pad_token_id)
            report[label] = stats
        mask = batch["attention_mask"].bool()
        report["kl_divergence"] = _mean_kl(logits["original"], logits["quantized"], mask)
        report["size_ratio"] = _ratio(report["original"]["disk_bytes"], report["quantized"]["disk_bytes"])
        report["memory_ratio"] = _ratio(report["original"]["memory_bytes"], report["quantized"]["memory_bytes"])
        report["speedup"] = _ratio(report["original"]["latency_ms_mean"], report["quantized"]["latency_ms_mean"])
        return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _disk_bytes(model) -> int | None:
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    return folder_size(path) or None if path.is_dir() else None


@torch.inference_mode()
def _measure(model, inputs: dict, num_runs: int, pad_token_id: int) -> tuple[dict, torch.Tensor]:
    model.eval()
    logits = model(**inputs).logits.float()  # also the warm-up
    times = []
    for _ in range(num_runs):
        start = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - start) * 1000)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    loss = model(**inputs, labels=labels).loss.item()
    new_tokens = 16
    first = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    start = time.perf_counter()
    generate_batch(model, [first], SamplingParams(max_new_tokens=new_tokens), pad_token_id=pad_token_id)
    generation_s = time.perf_counter() - start
    stats = {
        "latency_ms_mean": sum(times) / len(times) if times else None,
        "latency_ms_p50": _percentile(times, 0.5) if times else None,
        "latency_ms_p95": _percentile(times, 0.95) if times else None,
        "generation_tokens_per_s": new_tokens / generation_s,
        "memory_bytes": model.get_memory_footprint(),
        "disk_bytes": _disk_bytes(model),
        "perplexity": math.exp(loss),
    }
    return stats, logits.cpu()


def _mean_kl(original: torch.Tensor, quantized: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real tokens of KL(original || quantized) of the next-token distributions."""
    kl = torch.nn.functional.kl_div(
        quantized.log_softmax(-1), original.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    return kl[mask].mean().item()
