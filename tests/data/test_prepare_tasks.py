"""The one prepare pipeline: the same seeded split for every task (small N included), TASKS behind the CLI,
and error messages listing each task's accepted shapes from its table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aift.cli import main
from aift.data import DataError
from aift.data.prepare import TASKS, prepare, split


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        # (train, test) for val_ratio 0, 0.05, 0.5, 0.9
        (0, [(0, 0), (0, 0), (0, 0), (0, 0)]),
        (1, [(1, 0), (1, 0), (1, 0), (1, 0)]),  # a single example always trains
        (2, [(2, 0), (1, 1), (1, 1), (1, 1)]),  # at least one test example, at least one train example
        (3, [(3, 0), (2, 1), (1, 2), (1, 2)]),
        (4, [(4, 0), (3, 1), (2, 2), (1, 3)]),
    ],
)
def test_split_sizes_for_small_n(n, sizes):
    got = [tuple(map(len, split(n, val_ratio, seed=0))) for val_ratio in (0, 0.05, 0.5, 0.9)]
    assert got == sizes


def test_split_is_a_seeded_shuffle():
    assert split(5, 0.4, seed=42) == ([2, 4, 0], [3, 1])
    assert split(3, 0.5, seed=42) == ([2], [1, 0])
    train, test = split(50, 0.2, seed=7)
    assert sorted(train + test) == list(range(50)) and len(test) == 10
    assert (train, test) == split(50, 0.2, seed=7) != split(50, 0.2, seed=8)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(task: str, n: int) -> list[dict]:
    if task == "sft":
        return [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(n)]
    return [{"prompt": f"question {i}?", "chosen": f"answer {i}.", "rejected": f"no {i}."} for i in range(n)]


@pytest.mark.parametrize("task", ["sft", "preference"])
@pytest.mark.parametrize(("n", "val_ratio", "train", "test"), [(1, 0.9, 1, 0), (2, 0.9, 1, 1), (3, 0.5, 1, 2)])
def test_each_task_splits_small_files_alike(task, n, val_ratio, train, test, tmp_path, embedded_dir):
    from datasets import load_from_disk

    source = _write(tmp_path / f"{task}.jsonl", _rows(task, n))
    out = prepare(task, str(embedded_dir), source_path=source, output_dir=tmp_path / "out", val_ratio=val_ratio)
    counts = json.loads((out / "prepare.json").read_text())["counts"]
    assert (counts["train"], counts["test"]) == (train, test)
    data = load_from_disk(str(out))
    # The same rows go to test whatever the task: the split is one rule over the kept examples.
    expected = sorted(f"question {i}?" for i in split(n, val_ratio, seed=42)[1])
    assert sorted(re.search(r"question \d+\?", row["prompt"]).group() for row in data["test"]) == expected


def test_cli_task_choices_and_help_come_from_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, task in TASKS.items():
        assert f"{name}: {task.summary}" in shown
    assert "{" + ",".join(TASKS) + "}" in shown


@pytest.mark.parametrize("task", list(TASKS))
def test_unknown_columns_list_every_shape_of_the_task(task, tmp_path, embedded_dir):
    source = _write(tmp_path / "odd.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(DataError, match=r"odd\.jsonl: cannot tell the .* shape from columns \['bar', 'foo'\]") as e:
        prepare(task, str(embedded_dir), source_path=source, output_dir=tmp_path / "out")
    for shape in TASKS[task].shapes.shapes.values():
        assert shape.help in str(e.value)


def test_preference_reads_csv(tmp_path, embedded_dir):
    """A CSV file was checked against SFT's shapes while it was read, so a preference CSV was refused."""
    source = tmp_path / "pairs.csv"
    source.write_text("prompt,chosen,rejected\nWhat is 2+2?,4.,5.\nWhat is 3+3?,6.,7.\n", encoding="utf-8")
    out = prepare("preference", str(embedded_dir), source_path=source, output_dir=tmp_path / "out", val_ratio=0)
    info = json.loads((out / "prepare.json").read_text())
    assert info["shape"] == "trl" and info["counts"]["kept"] == 2


def test_options_are_checked_for_the_task(tmp_path, embedded_dir):
    source = _write(tmp_path / "p.jsonl", _rows("preference", 2))
    with pytest.raises(DataError, match="--train-on-prompt does not apply"):
        prepare("preference", str(embedded_dir), source_path=source, train_on_prompt=True)
    with pytest.raises(DataError, match="valid sources: json, jsonl, csv, parquet"):
        prepare("preference", str(embedded_dir), source="alpaca", source_path=source)
    with pytest.raises(DataError, match="--task preference needs --source-path"):
        prepare("preference", str(embedded_dir))
    with pytest.raises(DataError, match="--num-samples must be positive"):
        prepare("preference", str(embedded_dir), source_path=source, num_samples=0)
