"""Writing a llama-architecture Hugging Face folder as one GGUF file (llama.cpp, Ollama, LM Studio).

Tensors are streamed from the folder's safetensors one at a time (an 8B model never sits in memory
twice), renamed with gguf's `TensorNameMap`, q_proj/k_proj rows permuted into the interleaved rotary
layout llama.cpp expects (as its convert_hf_to_gguf.py does), optionally converted to f16 / bf16 /
q8_0, and written to a temp file that is renamed into place only when complete.

    export_gguf("runs/merged", "model.q8_0.gguf", quant="q8_0")

Tokenizers written by :mod:`aift.export.gguf_tokenizer` (anything else raises NotAvailableError naming these):
- byte-level BPE (SmolLM2, Llama 3, ELYZA Llama-3): tokenizer model "gpt2", merges and the llama.cpp
  pre-tokenizer name both llama.cpp and transformers' reader know (llama-bpe, qwen2, tekken, gpt-4o, gpt-2);
- SentencePiece BPE with byte fallback (Llama 2, Swallow, Mistral v0.1, ELYZA Llama-2): tokenizer model
  "llama" with tokens, scores and token types (<0xNN> BYTE, special CONTROL, other added USER_DEFINED).
  Scores come from tokenizer.model, or from the merge order of tokenizer.json when there is none.
  Unigram SentencePiece models are refused: llama.cpp's "llama" tokenizer merges by score, not Viterbi.
  One difference no metadata can carry: llama.cpp puts ▁ before text that follows a special token
  (legacy=True), transformers' GGUF reader does not (legacy=False); a legacy=True source gets a warning.

Rope scaling written: none, linear (rope.scaling.* keys) and llama3 (the rope_freqs tensor llama.cpp
divides each frequency by, as convert_hf_to_gguf.py computes it). transformers' GGUF reader ignores
both for llama files, so `verify.verify_gguf` checks them in the file and restores them on read-back.
yarn, dynamic and longrope raise NotAvailableError with the reason.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aift.errors import NotAvailableError
from aift.export.gguf_tokenizer import GGUFExportError, add_tokenizer
from aift.utils.files import read_json_object

log = logging.getLogger(__name__)

# HF architecture -> GGUF architecture. Mistral (v0.1-style, no sliding window in llama.cpp's llama
# graph) is written as llama, as llama.cpp's converter does.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
SUPPORTED_MODELS_TEXT = "llama-architecture models (the embedded SmolLM2, Llama 2/3, ELYZA, Swallow, Mistral)"


@dataclass(frozen=True)
class _Plan:
    """One tensor to write: where it comes from and how it is stored."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType


GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")  # the --quant choices everywhere; 1-D tensors always stay f32


def quant_types() -> dict[str, object]:
    """The --quant choices and their GGML types."""
    from gguf import GGMLQuantizationType

    return {quant: GGMLQuantizationType[quant.upper()] for quant in GGUF_QUANTS}


def export_gguf(model_dir: str | Path, output: str | Path, quant: str = "f16", *, name: str | None = None) -> Path:
    """Writes a llama-architecture model folder as a GGUF file.

    Args:
        model_dir: A Hugging Face model folder (safetensors or .bin weights, tokenizer, config.json),
            or a registry alias such as ``smollm2-135m-instruct``.
        output: The .gguf file to write (replaced atomically).
        quant: f32, f16, bf16 or q8_0 (1-D tensors such as norms always stay f32).
        name: general.name in the metadata; default: the model's own name.

    Returns:
        The path of the written file.

    Raises:
        GGUFExportError: Unsupported architecture or tokenizer, quantized folder, bad quant name.
    """
    from gguf import GGUFWriter

    from aift.models.loading import resolve_model_path

    if quant not in quant_types():
        raise GGUFExportError(f"unknown GGUF quant {quant!r}; choose one of {', '.join(quant_types())}")
    folder = Path(resolve_model_path(str(model_dir)))
    config = _read_config(folder)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, SUPPORTED_ARCHITECTURES[config["architectures"][0]])
    try:
        _add_hyperparameters(writer, config, quant, name or _model_name(config, folder))
        add_tokenizer(writer, folder, config["vocab_size"])
        _write_tensors(writer, folder, config, quant_types()[quant])
        writer.close()
        os.replace(tmp, output)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    log.debug("wrote %s (%s, %.1f MB)", output, quant, output.stat().st_size / 1e6)
    return output


def _read_config(folder: Path) -> dict:
    """config.json, checked: a supported architecture, no bitsandbytes quantization, no rope scaling we cannot write."""
    config = read_json_object(folder / "config.json", "model config")
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(
            f"{folder}: architecture {architecture} cannot be exported to GGUF by aift; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} ({SUPPORTED_MODELS_TEXT})"
        )
    if config.get("quantization_config"):
        raise GGUFExportError(
            f"{folder} holds a bitsandbytes-quantized model; export the unquantized model "
            "(or the merged fp16/bf16 folder) and pass --quant q8_0 for a small file"
        )
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ("default", "linear", "llama3"):
        reason = _UNWRITTEN_ROPE.get(rope_type, "aift's GGUF exporter does not know it")
        raise NotAvailableError(
            f"{folder}: rope scaling {rope_type!r} cannot be exported to GGUF: {reason}. "
            "Written: default, linear and llama3 (Llama 3.1/3.2, ELYZA Llama-3.1)"
        )
    return config


# Why the other rope scalings transformers knows are refused.
_UNWRITTEN_ROPE = {
    "dynamic": "llama.cpp has no dynamic NTK scaling, so no GGUF can describe it",
    "yarn": "llama.cpp reads YaRN (rope.scaling.type yarn and its attention factor), but aift does not write it yet",
    "longrope": "LongRoPE (Phi-3 style) is not part of llama.cpp's llama graph",
}


def rope_parameters(config: dict) -> dict:
    """The model's rope settings in one dict (config.json has them under rope_parameters, older ones rope_scaling)."""
    merged = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    merged.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    merged["rope_type"] = merged.get("rope_type", merged.get("type")) or "default"
    return merged


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Per-frequency divisors for "llama3" rope scaling, as llama.cpp's rope_freqs tensor holds them.

    llama.cpp rotates pair i by position * base**(-2i/d) / factor[i]; the factors are those of
    convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: 1 for short wavelengths, `factor` for
    long ones, and a smooth blend in between.
    """
    rope = rope_parameters(config)
    dim = _head_dim(config)
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    if low == high:
        raise GGUFExportError("llama3 rope scaling with low_freq_factor == high_freq_factor has no smooth range")
    wavelength = 2 * np.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)
    factors = np.where(
        wavelength < old_context / high,
        1.0,
        np.where(wavelength > old_context / low, factor, 1.0 / ((1.0 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


def _model_name(config: dict, folder: Path) -> str:
    name = str(config.get("_name_or_path") or folder.name)
    # transformers reads a llama GGUF whose name mentions mistral as a Mistral model: only say so when it is one.
    if "mistral" in name.lower() and config["architectures"][0] != "MistralForCausalLM":
        name = folder.name
    return name


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hyperparameters(writer, config: dict, quant: str, name: str) -> None:
    from gguf import LlamaFileType, RopeScalingType

    file_types = {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(2)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(_head_dim(config))
    head_dim = _head_dim(config)
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    # llama3 scaling has no metadata key: llama.cpp takes it from the rope_freqs tensor (see _extra_tensors).


# ---------------------------------------------------------------------------------------------- tensors


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise GGUFExportError(
        f"{folder} has no safetensors weights (model.safetensors or an index); save it with aift merge"
    )


def _source_tensors(folder: Path) -> Iterator[tuple[str, object]]:
    """(HF name, torch tensor) pairs, read one at a time."""
    from safetensors import safe_open

    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, f.get_tensor(key)


def _source_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _storage_type(shape: tuple[int, ...], wanted):
    """norms and other 1-D tensors stay f32; a row not divisible into q8_0 blocks falls back to f16."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    if wanted == T.Q8_0 and shape[-1] % GGML_QUANT_SIZES[T.Q8_0][0] != 0:
        return T.F16
    return wanted


def _plan(folder: Path, config: dict, wanted) -> list[_Plan]:
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    plan = []
    for hf_name, shape in _source_shapes(folder).items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd, and transformers re-ties when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"{folder}: tensor {hf_name} has no GGUF name for the llama architecture")
        plan.append(_Plan(gguf_name, hf_name, shape, _storage_type(shape, wanted)))
    return plan


def _stored_nbytes(item: _Plan) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[item.qtype]
    return int(np.prod(item.shape)) // block * size


def _permute_for_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf.py's permute)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _convert(item: _Plan, tensor, config: dict) -> np.ndarray:
    import torch
    from gguf import quants

    data = tensor.to(torch.float32).numpy()
    if item.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        data = _permute_for_rope(data, config["num_attention_heads"])
    elif item.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        data = _permute_for_rope(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    return quants.quantize(np.ascontiguousarray(data), item.qtype)


def _extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the HF folder does not hold: rope_freqs for llama3 rope scaling (kept f32)."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    if rope_parameters(config)["rope_type"] != "llama3":
        return {}
    return {f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight": llama3_rope_factors(config)}


def _write_tensors(writer, folder: Path, config: dict, wanted) -> None:
    """Declares every tensor, writes the header, then streams the data in the declared order."""
    from tqdm.auto import tqdm

    plan = _plan(folder, config, wanted)
    extras = _extra_tensors(config)
    for gguf_name, data in extras.items():
        writer.add_tensor_info(gguf_name, data.shape, data.dtype, data.nbytes)
    for item in plan:
        writer.add_tensor_info(item.gguf_name, item.shape, np.float32, _stored_nbytes(item), raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in extras.values():
        writer.write_tensor_data(data)
    by_name = {item.hf_name: item for item in plan}
    pending = {}
    order = iter(plan)
    expected = next(order, None)
    with tqdm(total=len(plan), desc="GGUF", unit="tensor") as bar:
        for hf_name, tensor in _source_tensors(folder):
            if hf_name not in by_name:
                continue
            pending[hf_name] = tensor
            # tensors are written in plan order, which is the order they were read in
            while expected is not None and expected.hf_name in pending:
                writer.write_tensor_data(_convert(expected, pending.pop(expected.hf_name), config))
                bar.update(1)
                expected = next(order, None)
