"""`aift prepare --task preference`: every accepted shape, answer-only labels, row-level errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aift.cli import main
from aift.data import DataError
from aift.data.packing import IGNORE_INDEX
from aift.data.prepare import prepare_preference

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is the capital of France?"}
GOOD, BAD = "Paris.", "Lyon."

SHAPES = {
    "trl": {"prompt": USER["content"], "chosen": GOOD, "rejected": BAD},
    "trl_conversational": {
        "prompt": [SYSTEM, USER],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    },
    "trl_implicit_prompt": {
        "chosen": [USER, {"role": "assistant", "content": GOOD}],
        "rejected": [USER, {"role": "assistant", "content": BAD}],
    },
    "anthropic_hh": {
        "chosen": f"\n\nHuman: {USER['content']}\n\nAssistant: {GOOD}",
        "rejected": f"\n\nHuman: {USER['content']}\n\nAssistant: {BAD}",
    },
    "llamafactory_sharegpt": {
        "conversations": [{"from": "human", "value": USER["content"]}],
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
    "llamafactory_alpaca": {"instruction": "Name the capital.", "input": "France", "chosen": GOOD, "rejected": BAD},
}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_trains_only_the_answers(shape, tmp_path, embedded_dir, tokenizer):
    from datasets import load_from_disk

    rows = [SHAPES[shape]] * 3
    out = prepare_preference(str(embedded_dir), source_path=_write(tmp_path / "p.jsonl", rows),
                             output_dir=tmp_path / "out", val_ratio=0.34)  # fmt: skip
    row = load_from_disk(str(out))["train"][0]
    assert _trained_text(tokenizer, row["chosen_input_ids"], row["chosen_labels"]) == GOOD + "<|im_end|>"
    assert _trained_text(tokenizer, row["rejected_input_ids"], row["rejected_labels"]) == BAD + "<|im_end|>"
    first = next(i for i, label in enumerate(row["chosen_labels"]) if label != IGNORE_INDEX)
    assert "France" in tokenizer.decode(row["chosen_input_ids"][:first])  # the prompt is rendered before the answer
    assert row["chosen_input_ids"][:first] == row["rejected_input_ids"][:first]  # the same prompt for both
    info = json.loads((out / "prepare.json").read_text())
    assert info["task"] == "preference" and info["format"] == "template"
    assert info["counts"]["kept"] == 3 and info["counts"]["dropped"] == 0


def test_kto_rows_and_multi_turn_prompts(tmp_path, embedded_dir, tokenizer):
    from datasets import load_from_disk

    history = [USER, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    rows = [
        {"prompt": history, "completion": [{"role": "assistant", "content": "Rome."}], "label": True},
        {"prompt": "And of Spain?", "completion": "Lisbon.", "label": False},
    ]
    out = prepare_preference(str(embedded_dir), source_path=_write(tmp_path / "k.jsonl", rows),
                             output_dir=tmp_path / "kto", val_ratio=0)  # fmt: skip
    data = load_from_disk(str(out))["train"]
    by_label = {r["label"]: r for r in data}
    # Only the last answer trains; the earlier "Paris." of the history is prompt.
    assert _trained_text(tokenizer, by_label[True]["input_ids"], by_label[True]["labels"]) == "Rome.<|im_end|>"
    assert json.loads((out / "prepare.json").read_text())["task"] == "kto"


def test_row_errors_name_the_file_the_row_and_the_field(tmp_path, embedded_dir):
    path = _write(tmp_path / "bad.jsonl", [SHAPES["trl"], {"prompt": "Hi", "chosen": "Hello"}, SHAPES["trl"]])
    # Shape detection sees chosen + rejected in other rows: the bad row is dropped, or an error with --strict.
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: missing field 'rejected'"):
        prepare_preference(str(embedded_dir), source_path=path, output_dir=tmp_path / "o", strict=True)
    assert not (tmp_path / "o").exists()  # nothing half-written
    out = prepare_preference(str(embedded_dir), source_path=path, output_dir=tmp_path / "o", val_ratio=0)
    counts = json.loads((out / "prepare.json").read_text())["counts"]
    assert counts["dropped"] == 1 and counts["dropped_reasons"] == {"missing field 'rejected'": 1}
    with pytest.raises(DataError, match=r"only\.jsonl: cannot tell the preference shape .* \(missing 'rejected'\)"):
        prepare_preference(
            str(embedded_dir), source_path=_write(tmp_path / "only.jsonl", [{"prompt": "a", "chosen": "b"}])
        )
    same = _write(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}] * 2)
    with pytest.raises(DataError, match="2 of 2 rows were dropped .*'chosen' and 'rejected' are the same answer"):
        prepare_preference(str(embedded_dir), source_path=same, output_dir=tmp_path / "same")


def test_truncation_is_counted_and_cli_task_flag(tmp_path, embedded_dir, capsys):
    long_prompt = "word " * 200
    rows = [{"prompt": long_prompt, "chosen": GOOD, "rejected": BAD}, SHAPES["trl"]]
    src = _write(tmp_path / "long.jsonl", rows)
    code = main(["prepare", "--task", "preference", "--model", str(embedded_dir), "--source-path", str(src),
                 "--output-dir", str(tmp_path / "cli"), "--max-length", "64", "--val-ratio", "0"])  # fmt: skip
    assert code == 0 and str(tmp_path / "cli") in capsys.readouterr().out
    info = json.loads((tmp_path / "cli" / "prepare.json").read_text())
    assert info["counts"]["truncated"] == {"prompt": 2, "answer": 0}  # chosen and rejected of the long row
    assert main(["prepare", "--task", "preference", "--source-path", str(tmp_path / "missing.jsonl")]) == 2


def test_preview_shows_chosen_and_rejected_side_by_side(tmp_path, embedded_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    out = prepare_preference(str(embedded_dir), source_path=_write(tmp_path / "p.jsonl", [SHAPES["trl"]] * 2),
                             output_dir=tmp_path / "pv", val_ratio=0)  # fmt: skip
    assert main(["preview", str(out), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    header = next(line for line in shown.splitlines() if "chosen:" in line)
    assert "rejected:" in header  # one row, two columns
    row = next(line for line in shown.splitlines() if "[[Paris.<|im_end|>]]" in line)
    assert "[[Lyon.<|im_end|>]]" in row  # the answers face each other
    assert "France?<|im_end|>" in shown and "[[What" not in shown  # the prompt is shown, untrained


def test_public_api_exports_the_preference_trainer():
    import aift

    assert aift.PreferenceTrainer.__name__ == "PreferenceTrainer"
    assert aift.PreferenceConfig().resolved_beta == 0.1
    assert aift.PreferenceConfig(method="simpo").resolved_beta == 2.0
