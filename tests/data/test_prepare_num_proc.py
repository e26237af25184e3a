"""`prepare_dataset` gives the same bytes whatever ``num_proc`` its tokenizing map runs with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from aift.data import DataError
from aift.data.prepare import prepare_dataset

MODEL = "smollm2-135m-instruct"


def alpaca_rows(n: int) -> list[dict[str, str]]:
    return [
        {
            "instruction": f"質問 {i}: {'とても' * (i % 7)}大事なこと",
            "input": "" if i % 3 else f"文脈 {i}",
            "output": f"答え {i}",
        }
        for i in range(n)
    ]


def test_num_proc_2_gives_the_same_ids_and_labels_as_num_proc_1(tmp_path: Path):
    source = tmp_path / "rows.json"
    rows = alpaca_rows(40)
    rows[5]["output"] = ""  # a dropped row, so both runs also agree on what they drop
    source.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    outs = [
        prepare_dataset(MODEL, "json", source, output_dir=tmp_path / f"p{n}", max_length=24, num_proc=n) for n in (1, 2)
    ]
    one, two = (load_from_disk(str(out)) for out in outs)
    for split in ("train", "test"):
        assert one[split].to_dict() == two[split].to_dict()
    info = [json.loads((out / "prepare.json").read_text(encoding="utf-8")) for out in outs]
    assert info[0]["counts"] == info[1]["counts"] and info[0]["tokens"] == info[1]["tokens"]
    assert info[0]["counts"]["truncated"]["prompt"] > 0


def test_num_proc_must_be_positive(tmp_path: Path):
    with pytest.raises(DataError, match="--num-proc"):
        prepare_dataset(MODEL, "json", tmp_path / "none.json", output_dir=tmp_path / "p", num_proc=0)
