"""`aift prepare --mix`: the three ways to name sources, how many examples each gives, SFT mixed with text for
replay, the same dataset for the same seed, and the per-source counts in prepare.json and `aift preview`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from aift.cli import main
from aift.data import DataError
from aift.data.mixture import MixSource, draw, draw_counts, parse_mix, prepare_mixture
from aift.data.prepared import read_prepared
from aift.training.batching import BatchPlanner, to_examples

REPO = Path(__file__).resolve().parents[2]


def _text(path: Path, n: int) -> Path:
    rows = [{"text": f"第{i}章。醤油の仕込みは{i}日目に始まる。"} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_flag_yaml_and_list_name_the_same_sources(tmp_path):
    items = [{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}]
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"datasets": items}))
    expected = [MixSource("a.jsonl", "pretrain", weight=0.7), MixSource("b.jsonl", "pretrain", weight=0.3)]
    assert parse_mix("a.jsonl:0.7,b.jsonl:0.3", "pretrain") == expected
    assert parse_mix(config, "pretrain") == parse_mix(items, "pretrain") == expected
    assert parse_mix("C:/data/a.jsonl", "sft") == [MixSource("C:/data/a.jsonl")]  # a ':' of the path
    for item, message in [
        ({"path": "a", "weight": 1, "samples": 2}, "weight or samples, not both"),
        ({"path": "a", "split": "dev"}, "split must be one of auto, train, test"),
        ({"path": "a", "wieght": 1}, r"unknown key\(s\) \['wieght'\]"),
        ({"path": "a", "task": "rl"}, "unknown task 'rl'"),
    ]:
        with pytest.raises(DataError, match=message):
            parse_mix([item])


def test_how_many_examples_each_source_gives():
    sources = [MixSource("a", weight=0.7), MixSource("b", weight=0.3), MixSource("c", samples=5), MixSource("d")]
    # b is the scarcest for its weight: used whole; a drawn down to 0.7 of the mixture; c upsampled; d whole.
    assert draw_counts(sources, [100, 10, 2, 4]) == [23, 10, 5, 4]
    drawn = draw(5, 2, random.Random(0))
    assert sorted(drawn) in ([0, 0, 0, 1, 1], [0, 0, 1, 1, 1]) and drawn[:4] == [0, 1, 0, 1]


def test_sft_mixed_with_text_is_seeded_counted_and_trainable(tmp_path, embedded_dir, tokenizer, capsys):
    text = _text(tmp_path / "domain.jsonl", 12)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join((REPO / "data" / "ja_qa.jsonl").read_text(encoding="utf-8").splitlines(True)[:30]), "utf-8")
    items = [{"path": str(text), "task": "pretrain", "weight": 0.5}, {"path": str(qa), "task": "sft", "weight": 0.5}]

    def make(seed: int, name: str):
        out = prepare_mixture(items, str(embedded_dir), output_dir=tmp_path / name, max_length=48, val_ratio=0.25,
                              seed=seed, min_doc_tokens=2)  # fmt: skip
        return read_prepared(out)

    data, info = make(1, "a")
    again, _ = make(1, "b")
    other, _ = make(2, "c")
    assert data["train"].to_dict() == again["train"].to_dict() != other["train"].to_dict()
    text_counts, sft_counts = info["mixture"]
    assert (text_counts["drawn"], sft_counts["drawn"]) == (12, 12) and sft_counts["available"] == 30
    assert text_counts["train"] + sft_counts["train"] == 18 and info["counts"]["test"] > 0
    blocks = data["train"]["block"]
    assert blocks.count(-1) == sft_counts["train_rows"] == 9  # SFT rows: packed by the trainer
    # The trainer keeps the text's blocks and packs the SFT rows around them: every row once per epoch.
    examples = to_examples(tmp_path / "a", tokenizer, 48, "training")
    planner = BatchPlanner(examples, 2, 48, True, tokenizer.pad_token_id, seed=0)
    rows = [i for batch in planner.epoch(0) for row in batch for i in row]
    assert sorted(rows) == list(range(len(data["train"])))
    assert len(examples.blocks) == len({b for b in blocks if b >= 0})
    assert main(["preview", str(tmp_path / "a"), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert f"source {text} (pretrain, weight 0.5, split auto): 12 of 12 examples (50% of the mixture)" in shown


def test_cli_mix_and_streaming_errors(tmp_path, embedded_dir, capsys):
    text = _text(tmp_path / "domain.jsonl", 4)
    argv = ["prepare", "--model", str(embedded_dir), "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--mix", f"{text}:1", "--source-path", str(text)]) == 2
    assert "--mix names its sources" in capsys.readouterr().err
    assert main([*argv, "--task", "pretrain", "--source-path", str(text), "--streaming"]) == 2
    assert "all are held out for eval (--eval-documents 100)" in capsys.readouterr().err
    prefs = {"path": str(text), "task": "preference"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"datasets": [prefs, {"path": str(text), "task": "pretrain"}]}))
    assert main([*argv, "--mix", str(tmp_path / "m.yaml")]) == 2
    assert "a mixture of preference pairs cannot hold pretrain data" in capsys.readouterr().err


def test_a_chat_source_keeps_its_prompt_messages_in_a_mixture(tmp_path, embedded_dir):
    """A chat source's prompt_messages column (GRPO's conversational data) reaches the mixture; the rows of the
    other sources get it empty, so the parts concatenate."""
    fixtures = REPO / "tests" / "data" / "fixtures"
    items = [{"path": str(fixtures / "messages.jsonl"), "task": "sft", "split": "train"},
             {"path": str(fixtures / "question_answer.json"), "task": "sft", "split": "train"}]  # fmt: skip
    data, _ = read_prepared(prepare_mixture(items, str(embedded_dir), output_dir=tmp_path / "mix", max_length=256))
    rows = data["train"].to_list()
    by_answer = {r["reference"]: r["prompt_messages"] for r in rows}
    assert json.loads(by_answer["Hi, how can I help?"]) == [{"role": "user", "content": "Hello!"}]
    assert by_answer["Eight."] == by_answer["Blue."] == "" and len(rows) == 4
