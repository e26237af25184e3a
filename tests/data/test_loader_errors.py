"""The errors `aift prepare` gives for bad data name the file, the row or column, and what was expected.

Each case below was a traceback, a silent mistake or an error without its row before: most are the falsifying
examples the fuzzer (test_loader_fuzz.py) found, kept here as explicit regressions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aift.cli import main
from aift.data import DataError
from aift.data.prepare import prepare_dataset
from aift.data.sources import load_conversations

MODEL = "smollm2-135m-instruct"


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_unknown_columns_list_every_accepted_shape(tmp_path):
    """`question,answer_text` has a question column but no known answer column: show all the shapes."""
    path = _write(tmp_path, "qa.csv", "question,answer_text\nWhat is 2+2?,4\n")
    with pytest.raises(DataError) as error:
        load_conversations("csv", path)
    message = str(error.value)
    assert "qa.csv" in message and "has 'question' but no answer column 'answer'" in message
    for shape in ("instruction/input/output", "prompt/completion", "question/answer", "messages", "conversations"):
        assert shape in message


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # RecursionError from json before: nesting deeper than Python's parser goes.
        (
            "deep.json",
            '[{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}]",
            r"deep.json: JSON .*nested too deeply",
        ),
        (
            "deep.jsonl",
            '{"a": 1}\n{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            r"deep.jsonl: JSON on line 2 is nested",
        ),
        # ValueError (not JSONDecodeError) from int(): more digits than Python converts.
        (
            "digits.json",
            '[{"prompt": "a",\n "completion": ' + "9" * 5000 + "}]",
            r"digits.json: malformed JSON on line 2: Exceeds",
        ),
        (
            "digits.jsonl",
            '{"prompt": "a", "completion": "b"}\n{"x": ' + "9" * 5000 + "}\n",
            r"digits.jsonl: malformed JSON on line 2",
        ),
        # csv.Error from the header row was not caught: a header cell over csv's field limit.
        (
            "header.csv",
            "instruction," + "x" * 200_000 + "\na,b\n",
            r"header.csv: malformed CSV header \(line 1\): field larger",
        ),
        (
            "utf16.json",
            '[{"prompt": "a", "completion": "b"}]'.encode("utf-16"),
            r"utf16.json is not UTF-8 \(it looks like UTF-16\)",
        ),
    ],
)
def test_file_level_failures_name_file_and_line(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        load_conversations(name.rsplit(".", 1)[1], path)


def test_jsonl_records_end_only_at_newline(tmp_path):
    """U+2028 is allowed raw inside a JSON string; str.splitlines() cut the record there."""
    path = _write(tmp_path, "sep.jsonl", '{"prompt": "one\u2028two", "completion": "three\u0085four"}\n')
    loaded = load_conversations("jsonl", path)
    assert loaded.examples[0][0]["content"] == "one\u2028two"
    assert loaded.examples[0][1]["content"] == "three\u0085four"


@pytest.mark.parametrize(
    ("content", "reason", "detail"),
    [
        # A list was silently stringified to "['a', 'b']" and trained on as the answer.
        (
            '{"instruction": "q", "output": ["a", "b"]}',
            "'output' is not text",
            "'output' holds a list; expected a string",
        ),
        ('{"instruction": {"k": 1}, "output": "a"}', "'instruction' is not text", "holds an object"),
        ('{"prompt": true, "completion": "a"}', "'prompt' is not text", "holds a boolean"),
        ('{"question": "q", "answer": "a", "system": [1]}', "'system' is not text", "holds a list"),
        # A lone surrogate (JSON escape) crashed the tokenizer with a TypeError in prepare.
        ('{"prompt": "a\\ud800b", "completion": "c"}', "'prompt' is not valid Unicode", "lone surrogate U+D800"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}',
            "'messages' turn 2 is not valid Unicode",
            "U+DFFF",
        ),
        (
            '{"instruction": "q", "output": ""}',
            "missing answer",
            "'output' is empty or absent; expected the answer text",
        ),
        (
            '{"conversations": {"from": "human"}}',
            "empty or missing 'conversations'",
            "is an object; expected a non-empty list",
        ),
    ],
)
def test_row_errors_name_row_field_and_expectation(tmp_path, content, reason, detail):
    path = _write(tmp_path, "rows.jsonl", content + "\n")
    loaded = load_conversations("jsonl", path)
    assert dict(loaded.dropped) == {reason: 1}
    with pytest.raises(DataError) as error:
        load_conversations("jsonl", path, strict=True)
    assert f"rows.jsonl line 1: {reason}" in str(error.value) and detail in str(error.value)


def test_numbers_are_text_as_written(tmp_path):
    path = _write(tmp_path, "n.json", '[{"question": "6 x 7?", "answer": 42}]')
    assert load_conversations("json", path).examples[0][1]["content"] == "42"


def test_too_many_dropped_names_the_file_and_first_rows(tmp_path):
    path = _write(
        tmp_path,
        "bad.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n{"prompt": ["d"], "completion": "e"}\n',
    )
    with pytest.raises(DataError) as error:
        prepare_dataset(MODEL, "jsonl", path, output_dir=tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"{path}: 2 of 3 rows were dropped")
    assert "line 2: missing answer: 'completion' is empty or absent" in message
    assert "line 3: 'prompt' is not text: 'prompt' holds a list; expected a string" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_prints_the_row_level_error_in_one_line(tmp_path, capsys):
    path = _write(tmp_path, "qa.jsonl", '{"質問": "a", "回答": "b"}\n{"質問": "c", "回答": null}\n')
    assert main(["prepare", "--source-path", str(path), "--strict", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "qa.jsonl line 2: missing answer: '回答' is empty or absent; expected the answer text" in err
    assert not (tmp_path / "o").exists()


def test_hub_schema_from_a_local_copy_names_the_file(tmp_path):
    path = _write(tmp_path, "copy.csv", "prompt,completion\na,b\n")
    with pytest.raises(DataError, match=r"copy.csv \(--source dolly\): expected the columns instruction/response"):
        load_conversations("dolly", path)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    """A PermissionError / NotADirectoryError from mkdir was a traceback."""
    data = _write(tmp_path, "qa.jsonl", '{"prompt": "a", "completion": "b"}\n')
    blocker = _write(tmp_path, "file.txt", "not a folder")
    with pytest.raises(DataError, match=r"cannot write the dataset to .*file.txt/out: .*choose another --output-dir"):
        prepare_dataset(MODEL, "jsonl", data, output_dir=blocker / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "qa.jsonl"]


def test_chat_turn_of_the_wrong_type_says_so(tmp_path):
    path = _write(
        tmp_path,
        "chat.jsonl",
        '{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}\n',
    )
    with pytest.raises(
        DataError, match=r"chat.jsonl line 1: invalid conversation: message 1 \(user\): content is a list"
    ):
        load_conversations("jsonl", path, strict=True)


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_deep_nesting_in_a_hub_schema_copy_is_an_error_not_a_crash(tmp_path, name):
    """Arrow's JSON reader (datasets.load_dataset) died with a segmentation fault on this file."""
    row = '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}'
    path = _write(tmp_path, name, f"[{row}]" if name.endswith(".json") else row + "\n")
    with pytest.raises(DataError, match=rf"{name}: JSON .*nested too deeply"):
        load_conversations("alpaca", path)


def test_a_chat_template_that_refuses_a_row_drops_it_with_the_reason(tmp_path, tokenizer):
    """Templates such as Gemma's raise_exception('System role not supported'): a jinja2 traceback before."""
    import copy

    from aift.data.formats import get_format

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    system = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(DataError, match=r"chat template refuses this conversation \(system, user, assistant\): System"):
        get_format("template").render(system, strict)
    assert get_format("template").render(system[1:], strict).trained_text == "a<|im_end|>"
