"""`aift prepare --streaming`: the stream packs what pretrain's pack() packs, resumes at the same token, and
names what is wrong (a changed file, a bad JSON line, an unreadable kind)."""

from __future__ import annotations

import json
import os
import random

import pytest

from aift.data import DataError
from aift.data.prepare import prepare
from aift.data.prepared import read_prepared
from aift.data.pretrain import pack, tokenize_documents
from aift.data.stream_reader import read_documents
from aift.data.streaming import BlockStream, Corpus, prepare_streaming


def write_corpus(folder, files=3, rows=12, seed=0):
    """JSON Lines files of documents of very different lengths, and one Markdown file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for f in range(files):
        lines = [{"text": f"文書 {f}-{i}。" + "醸造の記録です。" * rng.randint(1, 40)} for i in range(rows)]
        lines.insert(3, {"text": "   "})  # an empty document: skipped
        (folder / f"part{f}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    (folder / "notes.md").write_text("# 酒造り\n\n" + "麹と酒母の話。" * 30, encoding="utf-8")
    return folder


def documents_of(dataset, eos):
    """The documents (token ids) of a pretrain split, joined back from its pieces (a piece without EOS goes on)."""
    docs, current = [], None
    for row in dataset:
        ids = list(row["input_ids"])
        current = ids if current is None else current + ids[1:]  # a continued piece repeats the last token
        if ids[-1] == eos:
            docs.append(current)
            current = None
    assert current is None
    return docs


def one_pass(corpus, tokenizer, max_length):
    stream = BlockStream(corpus, tokenizer, max_length)
    blocks = []
    while not stream.stats["passes"]:
        blocks.append(stream.next_block())
    return blocks, stream


def test_streamed_blocks_are_pretrains_blocks(tmp_path, embedded_dir, tokenizer):
    corpus_dir = write_corpus(tmp_path / "corpus")
    whole = prepare("pretrain", str(embedded_dir), source="text", source_path=corpus_dir, max_length=64,
                    val_ratio=0, output_dir=tmp_path / "whole")  # fmt: skip
    streamed = prepare_streaming(str(embedded_dir), corpus_dir, output_dir=tmp_path / "streamed", max_length=64,
                                 eval_documents=5)  # fmt: skip
    data, meta = read_prepared(streamed)
    assert len(data["train"]) == 0 and meta["counts"]["test"] == 5
    corpus = Corpus.from_record(meta["streaming"], "test")
    blocks, stream = one_pass(corpus, tokenizer, 64)
    # One pass is pack() of the same documents in the stream's order: same EOS, same pieces, same boundaries.
    texts = [t for i in corpus.order(0) for _, _, t in read_documents(corpus.files[i], corpus.start(i), "text") if t]
    assert blocks == pack(tokenize_documents(texts, tokenizer), 64)
    # The held-out documents and the streamed ones are exactly the documents of prepare without --streaming.
    eos = tokenizer.eos_token_id
    pieces = [[{"input_ids": p} for p in block] for block in blocks]
    streamed_docs = documents_of([p for block in pieces for p in block], eos) + documents_of(data["test"], eos)
    assert sorted(streamed_docs) == sorted(documents_of(read_prepared(whole)[0]["train"], eos))
    # notes.md and 4 rows of part0 are held out: of the 3 empty rows, the held-out part skipped 1, the stream 2.
    assert stream.stats["documents"] == len(streamed_docs) - 5 and stream.stats["dropped"] == 2
    assert meta["counts"]["held_out_rows_dropped"] == 1
    assert all(sum(map(len, block)) <= 64 for block in blocks)


def test_a_restored_stream_continues_at_the_same_document_and_token(tmp_path, embedded_dir, tokenizer):
    streamed = prepare_streaming(str(embedded_dir), write_corpus(tmp_path / "corpus", files=2), max_length=48,
                                 output_dir=tmp_path / "s", eval_documents=2)  # fmt: skip
    corpus = Corpus.from_record(read_prepared(streamed)[1]["streaming"], "test")
    reference = BlockStream(corpus, tokenizer, 48)
    expected = [reference.next_block() for _ in range(2 * one_pass(corpus, tokenizer, 48)[1].stats["blocks"] + 3)]
    stream = BlockStream(corpus, tokenizer, 48)
    mid_document = 0
    for k, block in enumerate(expected):
        if k % 7 == 3:  # in mid-document, across files and across the end of a pass
            state = stream.state_dict()
            mid_document += state["cursor"]["token"] > 0
            stream = BlockStream(corpus, tokenizer, 48)
            stream.load_state_dict(state)
        assert stream.next_block() == block, k
    assert mid_document >= 2 and stream.stats["passes"] == 2
    assert corpus.order(0) != corpus.order(1) or len(corpus.files) < 3  # each pass has its own file order


def test_streaming_errors_name_the_file(tmp_path, embedded_dir, tokenizer):
    corpus_dir = write_corpus(tmp_path / "corpus", files=1)
    out = prepare_streaming(str(embedded_dir), corpus_dir, output_dir=tmp_path / "s", max_length=32, eval_documents=2)
    corpus = Corpus.from_record(read_prepared(out)[1]["streaming"], "s")
    bad = corpus_dir / "part0.jsonl"
    with bad.open("a") as f:
        f.write('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=f"{bad}.* changed since `aift prepare --streaming`"):
        corpus.check(tokenizer, "s")
    stat = os.stat(bad)
    corpus = Corpus.from_record(read_prepared(out)[1]["streaming"], "s")
    corpus.files[1] = corpus.files[1].__class__(corpus.files[1].path, "jsonl", stat.st_size, stat.st_mtime_ns)
    with pytest.raises(DataError, match=f"{bad}: malformed JSON on line 15, column 10"):
        one_pass(corpus, tokenizer, 32)
    (corpus_dir / "table.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="table.csv: --streaming reads .* convert .csv files to JSON Lines"):
        prepare_streaming(str(embedded_dir), corpus_dir, output_dir=tmp_path / "t")
    (corpus_dir / "table.csv").unlink()
    with pytest.raises(DataError, match="all are held out for eval"):
        prepare_streaming(str(embedded_dir), corpus_dir / "notes.md", output_dir=tmp_path / "t")
    (tmp_path / "other.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="line 1 has no 'text' field .* --text-column"):
        prepare_streaming(str(embedded_dir), tmp_path / "other.jsonl", output_dir=tmp_path / "t")


def test_a_tokenizer_call_is_bounded_by_bytes_and_gives_the_unbounded_blocks(tmp_path, embedded_dir, tokenizer,
                                                                             monkeypatch):  # fmt: skip
    """Long .txt documents: the first block comes after ~batch_bytes read, not 64 documents; same blocks, same
    resume. One document over the bound is tokenized alone."""
    import aift.data.streaming as streaming

    folder = tmp_path / "docs"
    folder.mkdir()
    rng = random.Random(2)
    for i, kb in enumerate((30, 5, 90, 30, 1, 30, 30)):  # 90 KB: over the 64 KB bound below, tokenized alone
        sentences = [f"第{i}章の{j}番目の文。" + "蔵の記録を読む。" * rng.randint(1, 6) for j in range(kb * 20)]
        (folder / f"doc{i}.txt").write_text("".join(sentences)[: kb * 340], encoding="utf-8")
    out = prepare_streaming(str(embedded_dir), folder, output_dir=tmp_path / "s", max_length=256, eval_documents=1)
    corpus = Corpus.from_record(read_prepared(out)[1]["streaming"], "s")
    sizes = {f.path: f.size for f in corpus.files}
    read: list[int] = []  # bytes of each document the reader gave

    def counting(file, start, column):
        for record in read_documents(file, start, column):
            read.append(sizes[file.path])
            yield record

    monkeypatch.setattr(streaming, "read_documents", counting)
    bounded = BlockStream(corpus, tokenizer, 256, batch_bytes=64 << 10)
    bounded.next_block()
    assert 0 < sum(read) <= (64 << 10) + max(sizes.values()) and len(read) < 6  # the unbounded batch reads all 6
    read.clear()
    unbounded = BlockStream(corpus, tokenizer, 256, batch_bytes=1 << 40)
    expected = [unbounded.next_block() for _ in range(2 * one_pass(corpus, tokenizer, 256)[1].stats["blocks"] + 5)]
    assert len(read) >= 6
    assert [bounded.next_block() for _ in range(len(expected) // 3)] == expected[1 : len(expected) // 3 + 1]
    state = bounded.state_dict()
    assert state["cursor"]["token"] > 0  # restored in mid-document
    restored = BlockStream(corpus, tokenizer, 256, batch_bytes=64 << 10)
    restored.load_state_dict(state)
    assert [restored.next_block() for _ in range(len(expected) - len(expected) // 3 - 1)] == expected[
        len(expected) // 3 + 1 :
    ]
    assert restored.stats == unbounded.stats and restored.stats["passes"] == 2
