"""Writing a llama-architecture Hugging Face folder as one GGUF file (llama.cpp, Ollama, LM Studio).

Tensors are streamed from the folder's safetensors one at a time (an 8B model never sits in memory
twice), renamed with gguf's `TensorNameMap`, q_proj/k_proj rows permuted into the interleaved rotary
layout llama.cpp expects (as its convert_hf_to_gguf.py does), optionally converted to f16 / bf16 /
q8_0, and written to a temp file that is renamed into place only when complete.

    export_gguf("runs/merged", "model.q8_0.gguf", quant="q8_0")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aift.errors import AiftError, NotAvailableError

log = logging.getLogger(__name__)

# HF architecture -> GGUF architecture. Mistral (v0.1-style, no sliding window in llama.cpp's llama
# graph) is written as llama, as llama.cpp's converter does.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
SUPPORTED_MODELS_TEXT = "llama-architecture models (the embedded SmolLM2, Llama 2/3, ELYZA, Swallow, Mistral)"

# The split regexes transformers' GGUF tokenizer reader knows, keyed by the llama.cpp pre-tokenizer
# name it maps them from; a byte-level BPE whose pre-tokenizer is none of these cannot round-trip.
_PRE_TOKENIZER_NAMES = {"llama3": "llama-bpe", "qwen2": "qwen2", "tekken": "tekken", "gpt-4o": "gpt-4o"}


class GGUFExportError(AiftError):
    """The model folder cannot be written as GGUF; the message says why."""


@dataclass(frozen=True)
class _Plan:
    """One tensor to write: where it comes from and how it is stored."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType


def quant_types() -> dict[str, object]:
    """The --quant choices and their GGML types."""
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}


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
        _add_tokenizer(writer, folder, config["vocab_size"])
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
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
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
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise NotAvailableError(f"{folder}: rope scaling {rope_type!r} is not written by aift's GGUF exporter yet")
    return config


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
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    scaling = config.get("rope_scaling") or rope
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


# ---------------------------------------------------------------------------------------------- tokenizer


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """Vocabulary, token types, merges, special ids, the pre-tokenizer name and the chat template."""
    from gguf import SpecialVocab
    from transformers import AutoTokenizer

    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE" or not _is_byte_level(spec):
        raise NotAvailableError(
            f"{folder}: only byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM / ELYZA Llama-3 style) are exported "
            "to GGUF by aift so far; this one is SentencePiece-style (Llama 2, Swallow, Mistral v0.1). Export the "
            "merged folder with `aift export --format safetensors` and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec, folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.chat_template = None  # written below from the tokenizer, which also reads chat_template.jinja
    special.add_to_gguf(writer, quiet=True)
    # SpecialVocab reads bos/eos/unk/pad from the config files; the tokenizer's own values win.
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and kind not in special.special_token_ids:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    return decoder.get("type") == "ByteLevel" or any(d.get("type") == "ByteLevel" for d in decoder.get("decoders", []))


def _pre_tokenizer_name(spec: dict, folder: Path) -> str:
    """llama.cpp's name for how text is split before BPE, recognised from tokenizer.json."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    parts = pre.get("pretokenizers", [])
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    if len(splits) == 1:
        for short, long_name in _PRE_TOKENIZER_NAMES.items():
            if GGUF_PRE_TOKENIZER_SPLITS.get(short) == splits[0]:
                return long_name
    raise NotAvailableError(
        f"{folder}: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one aift can name in GGUF "
        "metadata, so the exported file would tokenize differently"
    )


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's token types (as convert_hf_to_gguf.py's get_vocab_base)."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


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


def _write_tensors(writer, folder: Path, config: dict, wanted) -> None:
    """Declares every tensor, writes the header, then streams the data in the declared order."""
    from tqdm.auto import tqdm

    plan = _plan(folder, config, wanted)
    for item in plan:
        writer.add_tensor_info(item.gguf_name, item.shape, np.float32, _stored_nbytes(item), raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
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
