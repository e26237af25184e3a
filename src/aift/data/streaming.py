"""`aift prepare --task pretrain --streaming`: a corpus larger than memory, tokenized and packed while training.

Prepare reads no more than it needs: it checks the files (readable kinds, the text column in the first
record) and records each one's path, size and modification time, the tokenizer (the ids of a probe text),
``max_length``, ``seed`` and the options in prepare.json's ``streaming`` record. Only the held-out split is
materialised: the first ``eval_documents`` documents of the corpus (in sorted file order), packed as a
pretrain test split, so `aift eval` and the eval during training work as for any prepared folder. The train
split is empty on disk.

Training (:class:`BlockStream`) reads the files lazily, a pass after a pass: each pass visits the files in a
seeded order (``seed + pass``), each file's documents in order and the held-out documents never. Documents
are tokenized in small batches (at most ``BATCH`` documents or ``BATCH_BYTES`` of text, a longer document
alone) and packed by the rule of aift.data.pretrain.pack (same EOS, a long document continued in the next
block, a block closed when a pass ends), so one pass gives exactly the blocks that ``pack`` gives for the same
documents in the same order. Memory holds a batch of documents and a block.

The stream's position is a :class:`Cursor`: (pass, file in the pass's order, byte offset and line of the
record, token in its document). It is saved in each checkpoint; a resumed stream continues at the same
document and token. Unlike prepare without --streaming, exact duplicates are kept (finding them needs
memory that grows with the corpus).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from aift.data import DataError
from aift.data.prepared import write_prepared
from aift.data.pretrain import EncodedDocuments, tokenize_documents
from aift.data.stream_reader import START, CorpusFile, Position, first_document_check, read_documents
from aift.data.task import EncodeOptions
from aift.data.text_sources import TEXT_SOURCES, corpus_files

log = logging.getLogger(__name__)

# A tokenizer call while streaming takes up to BATCH documents (fast tokenizers batch well) and closes early at
# BATCH_BYTES of UTF-8 text, so a pass starting on long documents makes its first block after ~1 MB tokenized
# (~1.5 s here), not 64 of them. A longer document is tokenized alone, whole: the same tokens as without a bound.
BATCH = 64
BATCH_BYTES = 1 << 20
PROBE = "aift streaming probe: 日本語のテキストと English text, 123."  # its ids tell one tokenizer from another


@dataclass(frozen=True)
class Cursor:
    """Where a stream stands: the next record to read (or the one being packed) and the token in it."""

    epoch: int = 0  # passes over the corpus done
    file: int = 0  # index into the pass's file order
    offset: int = 0  # byte offset of the JSON Lines record (Parquet: its row; a text file: 0, or its size once read)
    line: int = 1
    token: int = 0  # first token of the document still to pack


@dataclass
class Corpus:
    """What `aift prepare --streaming` recorded: the files, how to read them, and the split held out."""

    files: list[CorpusFile]
    text_column: str
    seed: int
    max_length: int
    min_doc_tokens: int
    held_out: dict[int, Position]  # file index -> where training starts reading it (after the held-out part)
    probe: list[int]  # the tokenizer's ids for PROBE
    fill: float = 1.0  # the held-out blocks' fill: the packing efficiency to expect

    def order(self, epoch: int) -> list[int]:
        """The files of one pass, in a seeded order."""
        order = list(range(len(self.files)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def start(self, index: int) -> Position:
        return tuple(self.held_out.get(index, START))

    def record(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["held_out"] = {str(k): list(v) for k, v in self.held_out.items()}
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any], origin: str) -> Corpus:
        try:
            files = [CorpusFile(**f) for f in data["files"]]
            held_out = {int(k): (int(v[0]), int(v[1])) for k, v in data["held_out"].items()}
            fields = {k: data[k] for k in ("text_column", "seed", "max_length", "min_doc_tokens", "probe", "fill")}
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{origin}: prepare.json's streaming record is damaged ({e}); prepare again") from e
        return cls(files=files, held_out=held_out, **fields)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]

    def check(self, tokenizer, origin: str) -> None:
        """DataError when a file changed since prepare, or the tokenizer is not prepare's."""
        for file in self.files:
            problem = file.changed()
            if problem:
                raise DataError(
                    f"{file.path} changed since `aift prepare --streaming` wrote {origin}: {problem}; the stream "
                    "(and a checkpoint's position in it) would not be the same: prepare again"
                )
        if tokenizer(PROBE)["input_ids"] != self.probe:
            raise DataError(
                f"{origin} was prepared with another tokenizer than this model's (streamed text is tokenized in "
                "training): train the model it was prepared for, or prepare again with --model"
            )


@dataclass
class StreamedExamples:
    """The train split of a streamed folder: no rows in memory, blocks are made as the corpus is read."""

    corpus: Corpus
    tokenizer: Any
    name: str
    prompt_format: str | None = None
    rows: list = field(default_factory=list)
    blocks: None = None


def streamed_examples(path: Path, meta: dict, tokenizer, name: str) -> StreamedExamples:
    """The train split of a folder `aift prepare --streaming` wrote, checked against its files and tokenizer."""
    corpus = Corpus.from_record(meta["streaming"], str(path))
    corpus.check(tokenizer, str(path))
    return StreamedExamples(corpus, tokenizer, name, meta.get("prompt_format"))


class Doc(NamedTuple):
    """A document read and tokenized (``ids`` None: the end of a pass), with the rows dropped just before it."""

    at: Cursor
    after: Cursor
    ids: list[int] | None
    dropped: int


class BlockStream:
    """Blocks of at most ``max_length`` tokens, each a list of pieces, pass after pass (see the module)."""

    def __init__(
        self, corpus: Corpus, tokenizer, max_length: int, batch: int = BATCH, batch_bytes: int = BATCH_BYTES
    ) -> None:
        self.corpus, self.tokenizer, self.max_length = corpus, tokenizer, max_length
        self.batch, self.batch_bytes = batch, batch_bytes  # the tokenizer call's bound (see BATCH)
        first = corpus.order(0)[0]
        self.cursor = Cursor(0, 0, *corpus.start(first))
        self.stats: Counter = Counter()  # documents, tokens (of documents packed whole), blocks, dropped, passes
        self._restart()

    def _restart(self) -> None:
        self._docs = self._documents(self.cursor)
        self._head: Doc | None = None
        self._token = self.cursor.token  # where the first document read continues

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": dataclasses.asdict(self.cursor), "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = Cursor(**state["cursor"])
        self.stats = Counter(state["stats"])
        self._restart()

    def next_block(self) -> list[list[int]]:
        """The next block; the cursor then points at the document and token the block after it starts with."""
        block: list[list[int]] = []
        free = self.max_length
        while True:
            if self._head is None:
                doc = next(self._docs)
                self.stats["dropped"] += doc.dropped
                if doc.ids is None:  # a pass ends: its last block is closed, as pack() ends a split
                    self.cursor = doc.after
                    self.stats["passes"] += 1
                    if block:
                        return self._close(block)
                    continue
                self._head, start = doc, self._token
                self._token = 0
                self.stats["documents"] += start == 0
            else:
                start = self.cursor.token
            ids = self._head.ids
            piece = ids[start : start + free]
            block.append(piece)
            free -= len(piece)
            if start + len(piece) >= len(ids):
                self.stats["tokens"] += len(ids)
                self.cursor, self._head = self._head.after, None
            else:  # continued in the next block, from this piece's last token (see aift.data.pretrain)
                self.cursor = dataclasses.replace(self._head.at, token=start + len(piece) - 1)
                return self._close(block)
            if free < 2:
                return self._close(block)

    def _close(self, block: list[list[int]]) -> list[list[int]]:
        self.stats["blocks"] += 1
        return block

    def _documents(self, cursor: Cursor) -> Iterator[Doc]:
        """Every document from ``cursor`` on, tokenized a batch at a time, with an end marker after each pass."""
        corpus, epoch, first = self.corpus, cursor.epoch, cursor.file
        position: Position | None = (cursor.offset, cursor.line)
        self._dropped, empty_passes = 0, 0  # rows dropped since the last document; passes that kept none
        while True:
            order, kept, pending, size = corpus.order(epoch), 0, [], 0
            for k in range(first, len(order)):
                start = position or corpus.start(order[k])
                for where, after, text in read_documents(corpus.files[order[k]], start, corpus.text_column):
                    pending.append((Cursor(epoch, k, *where), Cursor(epoch, k, *after), text))
                    size += len(text.encode()) if text else 0
                    if len(pending) >= self.batch or size >= self.batch_bytes:
                        for doc in self._tokenized(pending):
                            kept += 1
                            yield doc
                        pending, size = [], 0
                position = None
            for doc in self._tokenized(pending):
                kept += 1
                yield doc
            empty_passes = 0 if kept else empty_passes + 1
            if empty_passes > 1:  # the first may have started near its end (a resumed stream)
                raise DataError("the streamed corpus has no document to train on outside its held-out split")
            epoch, first = epoch + 1, 0
            after = Cursor(epoch, 0, *corpus.start(corpus.order(epoch)[0]))
            yield Doc(after, after, None, self._take_dropped())

    def _tokenized(self, pending: list[tuple[Cursor, Cursor, str | None]]) -> Iterator[Doc]:
        """The kept documents of ``pending``; rows without text and documents under min_doc_tokens are dropped."""
        texts = [text for _, _, text in pending if text is not None]
        ids = iter(tokenize_documents(texts, self.tokenizer) if texts else ())
        minimum = max(2, self.corpus.min_doc_tokens)  # a one-token document has no target
        for at, after, text in pending:
            tokens = next(ids) if text is not None else None
            if tokens is None or len(tokens) < minimum:
                self._dropped += 1
                continue
            yield Doc(at, after, tokens, self._take_dropped())

    def _take_dropped(self) -> int:
        dropped, self._dropped = self._dropped, 0
        return dropped


# ---------------------------------------------------------------------- prepare


def output_name(source_path: str | Path, model: str) -> str:
    """``pretrain_{corpus name}_{model basename}_streaming``, the folder under datasets/."""
    corpus = Path(str(source_path).rstrip("/*")).stem
    return f"pretrain_{corpus}_{Path(str(model).rstrip('/')).name}_streaming"


def prepare_streaming(
    model: str,
    source_path: str | Path | None,
    source: str | None = None,
    output_dir: str | Path | None = None,
    max_length: int = 2048,
    seed: int = 42,
    text_column: str | None = None,
    min_doc_tokens: int | None = None,
    eval_documents: int = 100,
    format: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """Checks and records a corpus for streamed training and writes its held-out split (see the module).

    Args:
        model: Registered name, hub id or folder: its tokenizer is recorded, and training must use the same.
        source_path: A file, a folder or a glob of .txt/.md/.jsonl/.ndjson/.parquet files.
        source: text (by suffix), jsonl or parquet; None is text.
        output_dir: Default ``datasets/pretrain_{corpus}_{model basename}_streaming``.
        max_length: Tokens per block.
        seed: Seed of each pass's file order.
        text_column: The column of JSON Lines / Parquet rows holding a document (default ``text``).
        min_doc_tokens: Documents with fewer tokens (EOS included) are skipped.
        eval_documents: The first N documents (in sorted file order) are held out for eval, never trained.
        format: The prompt format recorded for generation with the trained model (``auto``: the model's).
        trust_remote_code: Allow tokenizers that run code from their hub repository.

    Returns:
        The output folder.
    """
    from aift import __version__
    from aift.data.formats import default_system, resolve_format
    from aift.models.loading import load_tokenizer

    if source_path is None:
        raise DataError("--streaming needs --source-path FILE, FOLDER or GLOB")
    if source not in (None, *TEXT_SOURCES) or source in ("json", "csv"):
        raise DataError(f"--streaming reads the sources text, jsonl and parquet, not {source!r}")
    if max_length < 8:
        raise DataError(f"--max-length must be at least 8 tokens, got {max_length}")
    if eval_documents < 1:
        raise DataError(f"--eval-documents must be at least 1, got {eval_documents}")
    column = text_column or "text"
    files = [CorpusFile.of(path) for path in corpus_files(source_path)]
    for file in files:
        first_document_check(file, column)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    fmt = resolve_format(model, tokenizer, format)
    corpus = Corpus(files, column, seed, max_length, min_doc_tokens or 0, {}, tokenizer(PROBE)["input_ids"])
    held, dropped = _hold_out(corpus, tokenizer, eval_documents, str(source_path))
    options = EncodeOptions(str(model), tokenizer, fmt, default_system(model), None, max_length,
                            min_doc_tokens=corpus.min_doc_tokens, text_column=column)  # fmt: skip
    encoded = EncodedDocuments(held, dropped, options, corpus.min_doc_tokens)
    data = encoded.dataset([], list(range(len(held))))
    corpus.fill = encoded.blocks["test"]["fill"]
    info = {
        "task": "pretrain", "source": source or "text", "source_path": str(source_path), "model": str(model),
        "tokenizer": str(model), "tokenizer_class": type(tokenizer).__name__, "format": fmt.name,
        "prompt_format": fmt.name, "max_length": max_length, "seed": seed, "aift_version": __version__,
        "text_column": column, "min_doc_tokens": corpus.min_doc_tokens,
        "counts": {"train": None, "test": len(held), "held_out_rows_dropped": dropped["dropped"]},
        "blocks": {"max_length": max_length, "test": encoded.blocks["test"]},
        "streaming": {"files_bytes": sum(f.size for f in files), **corpus.record()},
    }  # fmt: skip
    out = Path(output_dir) if output_dir else Path("datasets") / output_name(source_path, model)
    write_prepared(out, data, info)
    log.info("prepared %s for streaming: %d files (%.1f MB), %d documents held out", out, len(files),
             info["streaming"]["files_bytes"] / 1e6, len(held))  # fmt: skip
    return out


def _hold_out(corpus: Corpus, tokenizer, n: int, origin: str) -> tuple[list[list[int]], Counter]:
    """The first ``n`` documents' ids, in sorted file order; fills ``corpus.held_out`` with where each file's
    training part starts. DataError when nothing is left to train on."""
    held: list[list[int]] = []
    dropped: Counter = Counter()
    minimum = max(2, corpus.min_doc_tokens)
    for index, file in enumerate(corpus.files):
        for _, after, text in read_documents(file, START, corpus.text_column):
            ids = tokenize_documents([text], tokenizer)[0] if text is not None else []
            if len(ids) < minimum:
                dropped["dropped"] += 1
                continue
            held.append(ids)
            corpus.held_out[index] = after
            if len(held) == n:
                if _has_more(corpus, index):
                    return held, dropped
                break
    raise DataError(
        f"{origin}: {len(held)} document(s) were read and all are held out for eval (--eval-documents {n}); "
        "a streamed corpus needs more documents than that: lower --eval-documents, or add text"
    )


def _has_more(corpus: Corpus, index: int) -> bool:
    """Whether any record follows the held-out part (a later file, or more of the last held-out file)."""
    if index < len(corpus.files) - 1:
        return True
    return next(read_documents(corpus.files[index], corpus.start(index), corpus.text_column), None) is not None
