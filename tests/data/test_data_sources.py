"""Sources: hub schemas through the hub code path (local files in the exact schema), shape detection, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aift.data import DataError
from aift.data import sources as src
from aift.data.sources import hub_rows, load_conversations, to_conversations

FIXTURES = Path(__file__).parent / "fixtures"


def _hub_dataset(path: Path):
    """A datasets.Dataset read from a local file, as load_dataset returns the hub's."""
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train")


@pytest.mark.parametrize(
    ("source", "fixture", "shape", "kept", "dropped"),
    [
        ("alpaca", "alpaca_hub.json", "alpaca", 3, 1),
        ("dolly", "dolly_hub.jsonl", "dolly", 3, 0),
        ("wizardlm", "wizardlm_hub.json", "alpaca", 2, 0),
        ("wizardlm", "wizardlm_v2.jsonl", "sharegpt", 2, 0),
    ],
)
def test_hub_schema_through_the_hub_code_path(source, fixture, shape, kept, dropped):
    rows, detected = hub_rows(source, _hub_dataset(FIXTURES / fixture))
    assert detected == shape
    loaded = to_conversations(rows, detected, source)
    assert (len(loaded.examples), sum(loaded.dropped.values())) == (kept, dropped)
    # --source alpaca --source-path FILE goes through datasets.load_dataset and the same conversion.
    via_path = load_conversations(source, FIXTURES / fixture)
    assert via_path.examples == loaded.examples


def test_hub_schemas_keep_input_and_context():
    alpaca = load_conversations("alpaca", FIXTURES / "alpaca_hub.json")
    assert alpaca.examples[1] == [
        {"role": "user", "content": "Translate the sentence into French.", "input": "I like tea."},
        {"role": "assistant", "content": "J'aime le thé."},
    ]
    assert alpaca.dropped == {"missing answer": 1}
    dolly = load_conversations("dolly", FIXTURES / "dolly_hub.jsonl")
    assert dolly.examples[0][0]["input"].startswith("Virgin Australia commenced")
    assert dolly.examples[0][1]["content"] == "Virgin Australia commenced services on 31 August 2000."
    v2 = load_conversations("wizardlm", FIXTURES / "wizardlm_v2.jsonl")
    assert [m["role"] for m in v2.examples[1]] == ["user", "assistant", "user", "assistant"]


def test_hub_source_with_the_wrong_schema_names_the_columns():
    with pytest.raises(DataError, match="expected the columns instruction/response"):
        load_conversations("dolly", FIXTURES / "alpaca_hub.json")


def test_hub_unreachable_says_so_and_suggests_a_file(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("aift.models.loading.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match=r"hub cannot be reached.*--source json --source-path"):
        load_conversations("alpaca")


def test_hub_offline_and_not_cached_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"tatsu-lab/alpaca.*hub cannot be reached.*--source json --source-path"):
        load_conversations("alpaca")


@pytest.mark.parametrize(
    ("fixture", "shape", "first"),
    [
        (
            "messages.jsonl",
            "messages",
            [
                {"role": "system", "content": "あなたは親切なアシスタントです。"},
                {"role": "user", "content": "おすすめの本は？"},
                {"role": "assistant", "content": "『吾輩は猫である』はいかがでしょう。"},
                {"role": "user", "content": "作者は？"},
                {"role": "assistant", "content": "夏目漱石です。"},
            ],
        ),
        (
            "sharegpt.json",
            "sharegpt",
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of Japan?"},
                {"role": "assistant", "content": "Tokyo."},
            ],
        ),
        (
            "prompt_completion.jsonl",
            "prompt_completion",
            [{"role": "user", "content": "The capital of France is"}, {"role": "assistant", "content": "Paris."}],
        ),
        (
            "question_answer.json",
            "qa",
            [
                {"role": "user", "content": "How many legs does a spider have?"},
                {"role": "assistant", "content": "Eight."},
            ],
        ),
        (
            "qa_ja.csv",
            "qa_ja",
            [{"role": "user", "content": "日本一長い川は？"}, {"role": "assistant", "content": "信濃川です。"}],
        ),
        (
            "alpaca_hub.json",
            "alpaca",
            [
                {"role": "user", "content": "Give three tips for staying healthy."},
                {"role": "assistant", "content": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."},
            ],
        ),
        (
            "dolly_hub.jsonl",
            "dolly",
            [
                {
                    "role": "user",
                    "content": "When did Virgin Australia start operating?",
                    "input": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
                },
                {"role": "assistant", "content": "Virgin Australia commenced services on 31 August 2000."},
            ],
        ),
    ],
)
def test_local_shapes_are_detected(fixture, shape, first):
    loaded = load_conversations(None, FIXTURES / fixture)
    assert loaded.shape == shape
    assert loaded.examples[0] == first


def test_csv_keeps_quoted_newlines_and_a_trailing_question_is_dropped():
    csv_rows = load_conversations("csv", FIXTURES / "qa_ja.csv")
    assert csv_rows.examples[1][1]["content"] == "答えも\n二行です。"
    messages = load_conversations("jsonl", FIXTURES / "messages.jsonl")
    assert len(messages.examples) == 2 and messages.dropped == {"missing answer": 1}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"instruction": ["質問"], "output": ["回答"]}), path)
    assert load_conversations("parquet", path).examples[0][1]["content"] == "回答"


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("name", "source", "content", "message"),
    [
        (
            "bad.json",
            "json",
            '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"\n]',
            r"bad.json: malformed JSON at line 4",
        ),
        ("lines.json", "json", '{"a": 1}\n{"a": 2}\n', "use --source jsonl"),
        ("obj.json", "json", '{"instruction": "a", "output": "b"}', "expected a JSON array of objects"),
        ("bad.jsonl", "jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "malformed JSON on line 2"),
        (
            "missing.csv",
            "csv",
            "instruction,input\nq,i\n",
            r"has 'instruction' but no answer column 'output' \(alpaca\) or 'response'",
        ),
        ("unknown.csv", "csv", "foo,bar\n1,2\n", r"cannot tell the data shape from columns \['bar', 'foo'\]"),
        ("header.csv", "csv", "質問,回答\n", "has a header but no rows"),
        ("empty.json", "json", "", "is empty"),
        ("blank.jsonl", "jsonl", "  \n\n", "is empty"),
        ("latin1.jsonl", "jsonl", '{"q": "a"}\n{"q": "caf\xe9"}\n'.encode("latin-1"), r"is not UTF-8 \(line 2"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, name, source, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        load_conversations(source, path)


def test_missing_path_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_conversations("json", tmp_path / "nope.json")
    with pytest.raises(DataError, match="needs --source-path"):
        load_conversations("csv", None)
    with pytest.raises(DataError, match="valid sources: alpaca, dolly, wizardlm, json, jsonl, csv, parquet"):
        load_conversations("xml", tmp_path / "x.xml")


def test_row_without_answer_dropped_or_strict_error(tmp_path):
    path = _write(tmp_path, "qa.jsonl", '{"質問": "a", "回答": "b"}\n\n{"質問": "c", "回答": ""}\n')
    loaded = load_conversations("jsonl", path)
    assert len(loaded.examples) == 1 and loaded.dropped == {"missing answer": 1}
    with pytest.raises(DataError, match=r"qa.jsonl line 3: missing answer"):
        load_conversations("jsonl", path, strict=True)


def test_num_samples_larger_than_data_is_a_note(caplog):
    with caplog.at_level(logging.INFO, logger=src.__name__):
        loaded = load_conversations("json", FIXTURES / "question_answer.json", num_samples=50)
    assert len(loaded.examples) == 2
    assert "more than the 2 rows" in caplog.text
    assert len(load_conversations("json", FIXTURES / "question_answer.json", num_samples=1).examples) == 1


def test_user_assistant_strings_become_conversations():
    loaded = load_conversations(None, FIXTURES / "user_assistant.jsonl")
    assert loaded.shape == "user_assistant_text"
    assert loaded.examples[1] == [
        {"role": "user", "content": "東京の天気は？"},
        {"role": "assistant", "content": "晴れです。"},
        {"role": "user", "content": "明日は？"},
        {"role": "assistant", "content": "雨の予報です。"},
    ]
    assert sum(loaded.dropped.values()) == 1
