"""Writing a llama-architecture Hugging Face folder as one GGUF file (llama.cpp, Ollama, LM Studio).

Tensors are streamed from the folder's safetensors one at a time (an 8B model never sits in memory
twice), renamed with gguf's `TensorNameMap`, q_proj/k_proj rows permuted into the interleaved rotary
layout llama.cpp expects (as its convert_hf_to_gguf.py does), optionally converted to f16 / bf16 /
q8_0, and written to a temp file that is renamed into place only when complete.

    export_gguf("runs/merged", "model.q8_0.gguf", quant="q8_0")

Tokenizers written (anything else raises NotAvailableError naming these):
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
import re
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


# ---------------------------------------------------------------------------------------------- tokenizer


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """Vocabulary, token types, merges or scores, special ids, add-BOS/EOS flags and the chat template."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json or tokenizer.model; GGUF export needs the tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as e:
        raise GGUFExportError(f"{folder}: its tokenizer cannot be loaded ({e})") from e
    if not tokenizer.is_fast:
        raise GGUFExportError(f"{folder}: the tokenizer has no fast (tokenizer.json) form; GGUF export needs one")
    # The pipeline transformers actually runs (for a tokenizer.model-only folder: the one converted from it).
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] == "BPE" and _is_byte_level(spec):
        _add_byte_level_bpe(writer, folder, tokenizer, spec, vocab_size)
    elif _is_sentencepiece_bpe(spec):
        _add_sentencepiece(writer, folder, tokenizer, spec, vocab_size)
    else:
        raise NotAvailableError(
            f"{folder}: its tokenizer (model {spec['model']['type']}, pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}) is neither byte-level BPE (GPT-2 / Llama 3 / SmolLM / "
            "ELYZA Llama-3 style) nor SentencePiece BPE with byte fallback (Llama 2 / Swallow / Mistral v0.1 / "
            "ELYZA Llama-2 style), the two kinds aift writes to GGUF; export the folder with "
            "`aift export --format safetensors` and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_special_tokens(writer, folder: Path, tokenizer, n_tokens: int, load_merges: bool = False) -> None:
    """Special ids and add-BOS/EOS flags (as SpecialVocab reads them, the tokenizer's own values winning).

    The flags are always written: without them llama.cpp falls back to a default per tokenizer kind and
    pre-tokenizer (a BOS for "llama" and "llama-bpe"), whatever the source tokenizer does.
    """
    from gguf import SpecialVocab

    special = SpecialVocab(folder, load_merges=load_merges, n_vocab=n_tokens)
    special.chat_template = None  # written by the caller from the tokenizer, which also reads chat_template.jinja
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and 0 <= token_id < n_tokens:
            special.special_token_ids[kind] = token_id
    # What the tokenizer does, not what a config file claims: readers rebuild its post-processor from these.
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = len(with_specials) > len(without)
    ids = special.special_token_ids
    special.add_special_token["bos"] = added and "bos" in ids and with_specials[0] == ids["bos"]
    special.add_special_token["eos"] = added and "eos" in ids and with_specials[-1] == ids["eos"]
    special.add_to_gguf(writer, quiet=True)


def _add_byte_level_bpe(writer, folder: Path, tokenizer, spec: dict, vocab_size: int) -> None:
    """GPT-2-style vocabulary with merges and the llama.cpp pre-tokenizer name (convert_hf_to_gguf's _set_vocab_gpt2)."""
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec, folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _add_special_tokens(writer, folder, tokenizer, len(tokens), load_merges=True)


def _add_sentencepiece(writer, folder: Path, tokenizer, spec: dict, vocab_size: int) -> None:
    """A Llama-2-style vocabulary as llama.cpp's "llama" (SPM) tokenizer: tokens, scores and token types.

    llama.cpp merges adjacent symbols best score first, and transformers' GGUF reader rebuilds the BPE merges
    from the same scores, so the scores must rank merges as the source does. They come from tokenizer.model
    when there is one (as convert_hf_to_gguf.py's _set_vocab_sentencepiece), else from the merge order in
    tokenizer.json (convert_hf_to_gguf.py's LlamaHfVocab gives every token -1000 there, which loses the order).
    """
    _check_sentencepiece_prefix(spec, folder)
    tokens, types = _sentencepiece_vocabulary(tokenizer, vocab_size)
    proto = _sentencepiece_proto(folder)
    if proto is not None:
        scores = _scores_from_proto(proto, tokens, types, folder)
    else:
        scores = _scores_from_merges(spec["model"]["merges"], tokens, types)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_tokens(writer, folder, tokenizer, len(tokens))


def _is_sentencepiece_bpe(spec: dict) -> bool:
    """BPE with byte fallback on ▁-spelled text: what transformers' LlamaTokenizer builds (and GGUF readers rebuild)."""
    model = spec["model"]
    if model["type"] != "BPE" or not model.get("byte_fallback"):
        return False
    pre = spec.get("pre_tokenizer")
    if pre is not None:
        return pre.get("type") == "Metaspace" and not pre.get("split", False) and spec.get("normalizer") is None
    # The older (legacy) form: the normalizer prepends ▁ and replaces spaces, no pre-tokenizer.
    return _legacy_normalizer_prepends(spec) is not None


def _legacy_normalizer_prepends(spec: dict) -> bool | None:
    """For a Prepend/Replace normalizer: whether it prepends ▁; None for any other normalizer."""
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [step.get("type") for step in steps]
    replaces_spaces = any(
        step.get("type") == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == "▁"
        for step in steps
    )
    if not replaces_spaces or set(kinds) - {"Prepend", "Replace"}:
        return None
    return "Prepend" in kinds


def _check_sentencepiece_prefix(spec: dict, folder: Path) -> None:
    """transformers' GGUF reader always starts text with ▁ and adds none after special tokens; say where that differs."""
    pre = spec.get("pre_tokenizer")
    scheme = pre.get("prepend_scheme", "always") if pre is not None else None
    if pre is None:
        scheme = "always" if _legacy_normalizer_prepends(spec) else "never"
    if scheme == "never":
        raise NotAvailableError(
            f"{folder}: the tokenizer adds no leading ▁ (add_prefix_space=False); transformers' GGUF reader always "
            "adds one, so the exported file would tokenize differently"
        )
    if scheme == "always":
        log.warning(
            "%s: the tokenizer puts ▁ before text that follows a special token (legacy=True). llama.cpp does the "
            "same, but transformers' GGUF reader does not (legacy=False): text right after a special token "
            "tokenizes differently there",
            folder,
        )


def _sentencepiece_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's token types: <0xNN> are BYTE, special added tokens CONTROL."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        log.warning(
            "the tokenizer has %d tokens, the model %d: the extra ones are left out", max(by_id) + 1, vocab_size
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.BYTE if _BYTE_TOKEN.fullmatch(token) else TokenType.NORMAL)
    return tokens, types


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece_proto(folder: Path):
    """The parsed tokenizer.model when it is a SentencePiece BPE model; None when there is none or it is another kind."""
    from sentencepiece import sentencepiece_model_pb2

    path = folder / "tokenizer.model"
    if not path.is_file():
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError has no stable import path
        raise GGUFExportError(f"{path} is not a SentencePiece model ({e})") from e
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        log.warning("%s is not a BPE SentencePiece model: scores are taken from tokenizer.json's merges", path)
        return None
    return proto


def _scores_from_proto(proto, tokens: list[str], types: list[int], folder: Path) -> list[float]:
    """SentencePiece's own scores (-merge rank); added tokens -1000 and padding -10000, as convert_hf_to_gguf.py."""
    from gguf import TokenType

    scores = [-10000.0 if t == TokenType.UNUSED else -1000.0 for t in types]
    for i, piece in enumerate(proto.pieces[: len(tokens)]):
        if types[i] in (TokenType.NORMAL, TokenType.BYTE) and piece.piece != tokens[i]:
            raise GGUFExportError(
                f"{folder}: tokenizer.model and the tokenizer disagree at id {i} ({piece.piece!r} vs "
                f"{tokens[i]!r}); remove the stale one"
            )
        scores[i] = piece.score
    return scores


def _scores_from_merges(merges: list, tokens: list[str], types: list[int]) -> list[float]:
    """Scores a SentencePiece BPE model would have: -rank of the merge that makes a token, chars below all merges."""
    from gguf import TokenType

    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    scores = []
    for token, token_type in zip(tokens, types, strict=True):
        if token_type != TokenType.NORMAL:
            scores.append(-10000.0 if token_type == TokenType.UNUSED else 0.0)
        elif token in rank:
            scores.append(-float(rank[token]))
        else:  # a single character: never the result of a merge
            scores.append(-float(len(merges) + len(scores)))
    return scores


def _is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    return decoder.get("type") == "ByteLevel" or any(d.get("type") == "ByteLevel" for d in decoder.get("decoders", []))


def _pre_tokenizer_name(spec: dict, folder: Path) -> str:
    """llama.cpp's name for how text is split before BPE, recognised from tokenizer.json."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        # llama.cpp's name for GPT-2's split is "gpt-2" ("gpt2" fails to load there); transformers' reader
        # names no split for it and keeps its ByteLevel regex, the same split.
        return "gpt-2"
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
