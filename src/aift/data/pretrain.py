"""The pretrain task: documents -> token ids ending in EOS -> ``max_length`` blocks in which every token is trained.

`aift prepare --task pretrain` (documents from aift.data.text_sources). Each document is tokenized (with the
tokenizer's own special tokens, BOS where it adds one) and ends with EOS. Exact duplicates and documents
under ``--min-doc-tokens`` are dropped and counted. The documents are split into train/test (whole documents,
seeded), and each split is packed in order into blocks of ``max_length`` tokens: a document that does not fit
fills the block and continues in the next one.

A row of the prepared dataset is one *piece*: the part of a document inside one block, with its ``block``
number. The trainer packs a block's pieces into one row, each with its own position ids from 0 and the
block-causal (segment) mask, so attention never crosses a document boundary. A continued piece repeats the
last token of the piece before it, because the first token of a piece is never a target (nothing before it
in the block predicts it): every token of a document but its first is trained exactly once, so a split
trains ``tokens - documents`` targets. Eval scores each piece on its own, the same targets.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aift.data import DataError
from aift.data.shapes import Loaded
from aift.data.task import EncodeOptions
from aift.data.text_sources import load_documents

log = logging.getLogger(__name__)

NO_BLOCK = -1  # the ``block`` of a row the trainer packs itself (an SFT example in a mixture)
_BATCH = 512  # documents per tokenizer call
FILTERS = ("exact duplicate", "under --min-doc-tokens")  # drop reasons that are filters, not unreadable data


def output_name(source: str, source_path: str | Path | None, model: str, num_samples: int | None) -> str:
    """``pretrain_{corpus name}_{model basename}_{num_samples or all}``, the folder under datasets/."""
    corpus = Path(str(source_path).rstrip("/*")).stem if source_path else source
    return f"pretrain_{corpus}_{Path(str(model).rstrip('/')).name}_{num_samples or 'all'}"


def tokenize_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text's token ids (the tokenizer's special tokens included), ending with EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, so documents cannot be ended; choose another --model")
    out = []
    for start in range(0, len(texts), _BATCH):
        for ids in tokenizer(texts[start : start + _BATCH])["input_ids"]:
            out.append(ids if ids and ids[-1] == eos else [*ids, eos])
    return out


def pack(documents: list[list[int]], max_length: int) -> list[list[list[int]]]:
    """Blocks of at most ``max_length`` tokens, each a list of pieces, filled with the documents in order.

    A document that does not fit the block's free space fills it and continues in the next block; the
    continued piece starts with the token the previous piece ended with (see the module's docstring). A
    piece has at least 2 tokens: a block with less free space is closed.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    blocks: list[list[list[int]]] = []
    block: list[list[int]] = []
    free = max_length
    for ids in documents:
        start = 0
        while True:
            if free < 2:
                blocks.append(block)
                block, free = [], max_length
            piece = ids[start : start + free]
            block.append(piece)
            free -= len(piece)
            if start + len(piece) >= len(ids):
                break
            start += len(piece) - 1  # the next piece repeats this one's last token
            free = 0  # the document continues in the next block
    if block:
        blocks.append(block)
    return blocks


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class EncodedDocuments:
    """The kept documents' token ids, what was dropped, and the blocks of each split once packed."""

    ids: list[list[int]]
    dropped: Counter
    options: EncodeOptions
    min_doc_tokens: int
    truncated: Counter = field(default_factory=Counter)  # never: a long document continues in the next block
    blocks: dict[str, dict] = field(default_factory=dict)  # split -> its counts, filled by dataset()
    noun = "documents"

    @property
    def kept(self) -> int:
        return len(self.ids)

    def dataset(self, train: list[int], test: list[int]):
        """Each split's documents packed into blocks, one row per piece (see the module's docstring)."""
        from datasets import DatasetDict

        return DatasetDict({"train": self._split("train", train), "test": self._split("test", test)})

    def _split(self, name: str, positions: list[int]):
        from datasets import Dataset

        documents = [self.ids[i] for i in positions]
        blocks = pack(documents, self.options.max_length)
        pieces = [(b, piece) for b, block in enumerate(blocks) for piece in block]
        slots = len(blocks) * self.options.max_length
        tokens = sum(map(len, documents))
        self.blocks[name] = {
            "documents": len(documents),
            "tokens": tokens,
            "trained": tokens - len(documents),
            "blocks": len(blocks),
            "pieces": len(pieces),
            "fill": round(sum(len(p) for _, p in pieces) / slots, 4) if slots else 0.0,
        }
        columns = {
            "input_ids": [p for _, p in pieces],
            "attention_mask": [[1] * len(p) for _, p in pieces],
            "labels": [p for _, p in pieces],
            "block": [b for b, _ in pieces],
        }
        return Dataset.from_dict(columns, features=features())

    def info(self) -> dict:
        lengths = sorted(map(len, self.ids))
        splits = self.blocks
        return {
            "task": "pretrain",
            "tokenizer_class": type(self.options.tokenizer).__name__,
            "min_doc_tokens": self.min_doc_tokens,
            "documents": {
                "kept": self.kept,
                "exact_duplicates_dropped": self.dropped["exact duplicate"],
                "under_min_doc_tokens_dropped": self.dropped["under --min-doc-tokens"],
                "train": splits.get("train", {}).get("documents", 0),
                "test": splits.get("test", {}).get("documents", 0),
                "tokens_min": lengths[0] if lengths else 0,
                "tokens_max": lengths[-1] if lengths else 0,
            },
            "tokens": {"total": sum(lengths), "trained": sum(lengths) - len(lengths), **_per_split(splits, "tokens")},
            "blocks": {"max_length": self.options.max_length, **{k: dict(v) for k, v in splits.items()}},
        }


def _per_split(splits: dict[str, dict], key: str) -> dict[str, int]:
    return {name: counts[key] for name, counts in splits.items()}


def features():
    """The prepared pretrain dataset's columns and types."""
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "attention_mask": List(Value("int8")),
            "labels": List(Value("int32")),
            "block": Value("int32"),
        }
    )


def encode(loaded: Loaded, options: EncodeOptions) -> EncodedDocuments:
    """Drops exact duplicates (the first copy stays), tokenizes, drops documents under ``min_doc_tokens``."""
    dropped: Counter = Counter()
    seen: set[bytes] = set()
    texts = []
    for text in loaded.examples:
        digest = _digest(text)
        if digest in seen:
            dropped["exact duplicate"] += 1
            continue
        seen.add(digest)
        texts.append(text)
    minimum = max(2, options.min_doc_tokens)  # a one-token document has no target
    kept = []
    for ids in tokenize_documents(texts, options.tokenizer):
        if len(ids) < minimum:
            dropped["under --min-doc-tokens"] += 1
        else:
            kept.append(ids)
    if dropped:
        log.info("documents dropped: %s", ", ".join(f"{n} {why}" for why, n in dropped.items()))
    return EncodedDocuments(kept, dropped, options, options.min_doc_tokens)


def read(source: str | None, source_path, num_samples: int | None, strict: bool, options: EncodeOptions):
    """The task's reader for the prepare pipeline: (source name, the documents)."""
    return source or "text", load_documents(source, source_path, num_samples, strict, options.text_column)
