"""`aift prepare --task pretrain`: documents from files, folders, globs and text columns; EOS, dedup, the
--min-doc-tokens filter, and blocks in which every token of a document but its first is trained exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aift.cli import main
from aift.data import DataError
from aift.data.prepare import prepare
from aift.data.prepared import read_prepared
from aift.data.pretrain import pack
from aift.data.text_sources import load_documents


def _corpus(root: Path) -> Path:
    (root / "notes").mkdir(parents=True)
    (root / "a.txt").write_text("醤油は大豆と小麦と塩から造られる。\n", encoding="utf-8")
    (root / "notes" / "b.md").write_text("# 味噌\n\n味噌は大豆を発酵させた調味料である。", encoding="utf-8")
    (root / "notes" / "skip.png").write_bytes(b"\x89PNG")
    rows = [{"body": "みりんは甘い酒である。"}, {"body": "みりんは甘い酒である。"}, {"body": "  "}, {"body": "酢。"}]
    (root / "c.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.mark.parametrize("n", [2, 5, 9, 16, 40])
def test_pack_fills_blocks_in_order_and_trains_each_token_once(n):
    documents = [list(range(100 * d, 100 * d + length)) for d, length in enumerate([3, n, 2, 7, 30])]
    blocks = pack(documents, max_length=8)
    assert all(sum(map(len, block)) <= 8 and all(len(p) >= 2 for p in block) for block in blocks)
    assert all(sum(map(len, block)) >= 7 for block in blocks[:-1])  # only the last block may be short
    pieces = [piece for block in blocks for piece in block]
    # A piece's first token is never a target: the targets are every piece's tokens after the first.
    targets = [t for piece in pieces for t in piece[1:]]
    assert targets == [t for doc in documents for t in doc[1:]]
    # A continued piece starts with the token its previous piece ended with, in the next block.
    for prev, piece in zip(pieces, pieces[1:], strict=False):
        if piece[0] // 100 == prev[-1] // 100:
            assert piece[0] == prev[-1]


def test_documents_from_a_folder_a_glob_and_a_text_column(tmp_path):
    root = _corpus(tmp_path / "corpus")
    loaded = load_documents("text", root, text_column="body")
    assert loaded.examples == [
        "醤油は大豆と小麦と塩から造られる。",
        "みりんは甘い酒である。",
        "みりんは甘い酒である。",
        "酢。",
        "# 味噌\n\n味噌は大豆を発酵させた調味料である。",
    ]
    assert loaded.dropped == {"empty document": 1} and loaded.wheres[1].endswith("c.jsonl line 1")
    assert load_documents(None, f"{root}/**/*.md").examples == ["# 味噌\n\n味噌は大豆を発酵させた調味料である。"]
    with pytest.raises(DataError, match=r"c\.jsonl: cannot tell the text shape from columns \['body'\]"):
        load_documents("text", root)  # the JSONL rows hold `body`, not `text`
    with pytest.raises(DataError, match="matches no file"):
        load_documents("text", f"{root}/*.rst")


def test_prepare_json_counts_documents_tokens_blocks_and_drops(tmp_path, tokenizer, embedded_dir):
    root = _corpus(tmp_path / "corpus")
    minimum = len(tokenizer("酢。")["input_ids"]) + 2  # 酢。 and its EOS are under it
    out = prepare("pretrain", str(embedded_dir), source="text", source_path=root, output_dir=tmp_path / "out",
                  max_length=16, val_ratio=0.25, text_column="body", min_doc_tokens=minimum)  # fmt: skip
    data, info = read_prepared(out)
    texts = load_documents("text", root, text_column="body").examples
    lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in dict.fromkeys(texts)]  # + EOS, duplicates once
    short = sum(n < minimum for n in lengths)
    assert short == 1
    docs = info["documents"]
    assert docs["exact_duplicates_dropped"] == 1 and docs["under_min_doc_tokens_dropped"] == short
    assert docs["kept"] == len(lengths) - short == docs["train"] + docs["test"]
    kept = [n for n in lengths if n >= minimum]
    assert info["tokens"]["total"] == sum(kept) and info["tokens"]["trained"] == sum(kept) - len(kept)
    assert info["counts"]["dropped_reasons"] == {"empty document": 1, "exact duplicate": 1,
                                                 "under --min-doc-tokens": short}  # fmt: skip
    for name in ("train", "test"):
        split = data[name]
        blocks = info["blocks"][name]
        assert blocks["blocks"] == len(set(split["block"])) and blocks["pieces"] == len(split)
        assert split["labels"] == split["input_ids"]  # every token is trained
        ends = [ids[-1] for ids in split["input_ids"]]
        assert ends.count(tokenizer.eos_token_id) >= blocks["documents"]  # each document ends with EOS
        trained = sum(len(ids) - 1 for ids in split["input_ids"])  # the trainer's rule: a piece's first is not
        assert trained == blocks["trained"] == blocks["tokens"] - blocks["documents"]


def test_cli_pretrain_errors(tmp_path, embedded_dir, capsys):
    root = _corpus(tmp_path / "corpus")
    argv = ["prepare", "--model", str(embedded_dir), "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--text-column", "body", "--source-path", str(root / "c.jsonl")]) == 2
    assert "--text-column applies to --task pretrain only" in capsys.readouterr().err
    (tmp_path / "dups.jsonl").write_text('{"text": "同じ"}\n' * 5, encoding="utf-8")
    code = main([*argv, "--task", "pretrain", "--source-path", str(tmp_path / "dups.jsonl"), "--val-ratio", "0"])
    assert code == 0, "duplicates are a filter: 4 of 5 dropped is not a broken file"
    assert main([*argv, "--task", "pretrain", "--source-path", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "prose.jsonl").write_text('{"text": "ただの文章。"}\n{"text": "もう一つ。"}\n', encoding="utf-8")
    assert main([*argv, "--source-path", str(tmp_path / "prose.jsonl")]) == 2  # SFT reads `text` as a dialogue
    assert "for raw text (continued pretraining) use --task pretrain" in capsys.readouterr().err
