"""The tokenizer of a GGUF file: vocabulary, token types, merges or scores, special ids, chat template.

What `gguf_writer.export_gguf` writes besides the hyperparameters and tensors; the kinds written (byte-level
BPE, SentencePiece BPE with byte fallback) and why others are refused are in gguf_writer's docstring.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from aift.errors import AiftError, NotAvailableError

log = logging.getLogger(__name__)

# The split regexes transformers' GGUF tokenizer reader knows, keyed by the llama.cpp pre-tokenizer
# name it maps them from; a byte-level BPE whose pre-tokenizer is none of these cannot round-trip.
_PRE_TOKENIZER_NAMES = {"llama3": "llama-bpe", "qwen2": "qwen2", "tekken": "tekken", "gpt-4o": "gpt-4o"}


class GGUFExportError(AiftError):
    """The model folder cannot be written as GGUF; the message says why."""


def add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
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
