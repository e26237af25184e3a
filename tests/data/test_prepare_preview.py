"""`prepare_dataset`, `aift prepare` and `aift preview` end to end on the embedded tokenizer."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from aift.cli import main
from aift.data import DataError
from aift.data.packing import IGNORE_INDEX
from aift.data.prepare import prepare_dataset
from aift.data.prepared import read_prepared
from aift.data.preview import preview_dataset
from aift.training.batching import to_examples

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode(
        [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "messages"
    return prepare_dataset(MODEL, "jsonl", FIXTURES / "messages.jsonl", output_dir=out, max_length=512, val_ratio=0.5)


def test_prepared_folder_follows_the_contract(prepared, tokenizer):
    splits = load_from_disk(str(prepared))
    assert set(splits) == {"train", "test"}
    assert (len(splits["train"]), len(splits["test"])) == (1, 1)
    chats = [json.loads(line)["messages"] for line in (FIXTURES / "messages.jsonl").read_text().splitlines()]
    prompt_messages = {c[-1]["content"]: c[:-1] for c in chats}  # a chat source: each prompt's messages (GRPO)
    for split in splits.values():
        columns = {"input_ids", "attention_mask", "labels", "text", "prompt", "reference", "prompt_messages"}
        assert set(split.column_names) == columns
        for row in split:
            assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
            assert row["text"].startswith(row["prompt"])
            assert trained_text(tokenizer, row).endswith(row["reference"] + "<|im_end|>")
            assert json.loads(row["prompt_messages"]) == prompt_messages[row["reference"]]
    info = json.loads((prepared / "prepare.json").read_text())
    assert info["format"] == info["prompt_format"] == "template"
    assert info["model"] == info["tokenizer"] == MODEL
    assert info["shape"] == "messages"
    assert info["counts"] | {"dropped_reasons": None} == {
        "available": 3,
        "read": 3,
        "kept": 2,
        "dropped": 1,
        "dropped_reasons": None,
        "truncated": {"prompt": 0, "answer": 0},
        "train": 1,
        "test": 1,
    }
    assert info["counts"]["dropped_reasons"] == {"missing answer": 1}
    assert 0 < info["tokens"]["packing_efficiency"] <= 1
    assert info["tokens"]["length"]["max"] <= 512
    assert not [p for p in prepared.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_multi_turn_trains_every_answer(prepared, tokenizer):
    rows = [*load_from_disk(str(prepared))["train"], *load_from_disk(str(prepared))["test"]]
    multi = next(r for r in rows if "夏目漱石" in r["text"])
    assert trained_text(tokenizer, multi) == "『吾輩は猫である』はいかがでしょう。<|im_end|>夏目漱石です。<|im_end|>"


def test_truncation_is_counted(tmp_path):
    out = prepare_dataset(MODEL, "jsonl", FIXTURES / "messages.jsonl", output_dir=tmp_path / "t", max_length=40)
    info = json.loads((out / "prepare.json").read_text())
    assert info["counts"]["truncated"]["prompt"] == 2
    assert info["tokens"]["length"]["max"] == 40


def test_more_than_half_dropped_fails_and_writes_nothing(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n{"prompt": "d", "completion": " "}\n')
    with pytest.raises(DataError, match=r"2 of 3 rows were dropped \(2 missing answer\); nothing was written"):
        prepare_dataset(MODEL, "jsonl", data, output_dir=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_overwrites_a_prepared_dataset_but_not_other_folders(tmp_path, prepared):
    out = tmp_path / "out"
    prepare_dataset(MODEL, "json", FIXTURES / "question_answer.json", output_dir=out)
    prepare_dataset(MODEL, "json", FIXTURES / "sharegpt.json", output_dir=out)
    assert json.loads((out / "prepare.json").read_text())["shape"] == "sharegpt"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a prepared dataset"):
        prepare_dataset(MODEL, "json", FIXTURES / "sharegpt.json", output_dir=other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_default_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = prepare_dataset(MODEL, "dolly", FIXTURES / "dolly_hub.jsonl", num_samples=2)
    assert out == Path("datasets/dolly_smollm2-135m-instruct_2")
    assert json.loads((out / "prepare.json").read_text())["counts"]["read"] == 2


def test_cli_prepare_then_preview_marks_only_answers(tmp_path, capsys):
    out = tmp_path / "qa"
    code = main(
        [
            "prepare",
            "--source-path",
            str(FIXTURES / "question_answer.json"),
            "--output-dir",
            str(out),
            "--val-ratio",
            "0",
        ]
    )
    assert code == 0
    capsys.readouterr()
    assert main(["preview", str(out), "-n", "5"]) == 0
    shown = capsys.readouterr().out
    assert "[[Eight.<|im_end|>]]" in shown and "[[Blue.<|im_end|>]]" in shown
    assert shown.count("<|im_end|>]]") == shown.count("]]") - 2 == 2  # besides the two legends
    assert "trained /" in shown and "masked tokens" in shown


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    data = str(FIXTURES / "question_answer.json")
    assert main(["prepare", "--source-path", data, "--format", "vicuna", "--output-dir", str(tmp_path / "x")]) == 2
    assert "valid formats: auto, alpaca, chatml" in capsys.readouterr().err
    assert main(["prepare", "--source", "xml", "--source-path", data]) == 2
    assert "valid sources: alpaca, dolly" in capsys.readouterr().err
    assert main(["preview", str(tmp_path)]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_preview_warnings(tmp_path, tokenizer):
    data = tmp_path / "dup.jsonl"
    rows = ['{"question": "Same?", "answer": "Yes."}'] * 3 + ['{"question": "Long?", "answer": "' + "word " * 80 + '"}']
    data.write_text("\n".join(rows) + "\n")
    out = prepare_dataset(MODEL, "jsonl", data, format="chatml", output_dir=tmp_path / "d", max_length=48, val_ratio=0)
    preview = preview_dataset(out, n=4, tokenizer=tokenizer)
    assert any("2 duplicate example(s)" in w for w in preview.warnings)
    assert any("own chat template" in w for w in preview.warnings)
    long = next(e for e in preview.examples if "word" in e.bracketed())
    assert long.warnings == ["an answer does not end with the end-of-turn marker (<|im_end|>)"]
    assert preview.trained == sum(e.trained for e in preview.examples)


def test_wrapper_script_has_the_same_flags(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prepare_custom_dataset.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "datasets" / "prepare_custom_dataset.py"), run_name="__main__")
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: aift prepare")
    for flag in ("--source-path", "--num-samples", "--format", "--max-length", "--train-on-prompt", "--system"):
        assert flag in shown


@pytest.mark.slow
def test_bundled_japanese_qa_end_to_end(tmp_path, tokenizer, capsys):
    data = REPO / "data" / "ja_qa.json"  # tracked in git: a missing file is a failure, not a skip
    out = tmp_path / "ja_qa"
    args = ["prepare", "--model", MODEL, "--source", "json", "--source-path", str(data), "--format", "template"]
    assert main([*args, "--output-dir", str(out), "--max-length", "1024"]) == 0
    for split in load_from_disk(str(out)).values():
        for row in split:
            assert trained_text(tokenizer, row) == row["reference"] + "<|im_end|>"
    capsys.readouterr()
    assert main(["preview", str(out), "-n", "3"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("<|im_end|>]]") == 3 and "warning" not in shown


def test_train_on_prompt_and_system(tmp_path, tokenizer):
    out = prepare_dataset(
        MODEL,
        "json",
        FIXTURES / "question_answer.json",
        output_dir=tmp_path / "p",
        train_on_prompt=True,
        system="Answer in one word.",
        val_ratio=0,
    )
    row = load_from_disk(str(out))["train"][0]
    assert row["labels"] == row["input_ids"]
    assert "prompt_messages" not in row  # a question/answer source: only chat sources keep the prompt's messages
    assert row["text"].startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n")
    info = json.loads((out / "prepare.json").read_text())
    assert info["train_on_prompt"] is True and info["system"] == "Answer in one word."
    # Every label is trained here, position 0 included: prepare.json counts what the trainer trains on.
    train = to_examples(read_prepared(out)[0]["train"], tokenizer, 512, "train")
    assert info["tokens"]["trained"] == train.trained_tokens == sum(len(r["labels"]) - 1 for r in train.rows)


def test_preview_colours_on_a_terminal(prepared, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["preview", str(prepared), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "\x1b[1;32m" in shown and "[[" not in shown  # bold green answers, no brackets
