"""Sources -> rows -> a task's examples: hub datasets (alpaca, dolly, wizardlm) and local JSON / JSONL / CSV / parquet.

A local file's shape is detected from its columns in the task's shape table (aift.data.shapes); SFT's table
is here: alpaca, dolly, prompt/completion, chat ``messages`` and ShareGPT ``conversations`` (with ``tools``:
tool calling, see aift.data.tools; reasoning traces, see aift.data.reasoning), question/answer, 質問/回答. Hub sources have a fixed schema and go through ``datasets.load_dataset``; with ``--source-path``
the same schema is read from a local copy, which is also how the tests exercise each hub schema without a
network.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aift.data import DataError
from aift.data.conversation import Message, normalize
from aift.data.reasoning import ThinkingOnly
from aift.data.shapes import Drop, Loaded, Row, Shape, ShapeTable, convert_rows
from aift.data.tools import parse_tools

log = logging.getLogger(__name__)

FILE_SOURCES = ("json", "jsonl", "csv", "parquet")
HUB_DATASETS = {
    "alpaca": "tatsu-lab/alpaca",
    "dolly": "databricks/databricks-dolly-15k",
    "wizardlm": "WizardLMTeam/WizardLM_evol_instruct_70k",
}
SOURCES = (*HUB_DATASETS, *FILE_SOURCES)
_SUFFIX_SOURCE = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def _text(value: Any) -> str:
    """A cell as stripped text ('' for None/NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def check_encodable(text: str, what: str) -> str:
    """The text, unless it holds a lone surrogate (JSON's "\\ud800"), which no tokenizer or Arrow can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = f"U+{ord(text[e.start]):04X}"
        raise Drop(
            f"{what} is not valid Unicode", f"{what} holds a lone surrogate {char} at character {e.start}"
        ) from e
    return text


def _field_text(data: dict, key: str) -> str:
    """A field as stripped text: '' when absent or null; numbers as written; Drop for lists, objects, booleans."""
    value = data.get(key)
    if isinstance(value, bool) or not (value is None or isinstance(value, (str, int, float))):
        raise Drop(f"'{key}' is not text", f"'{key}' holds {_kind(value)}; expected a string")
    return check_encodable(_text(value), f"'{key}'")


def _pair(
    question: str, answer: str, context: str = "", system: str = "", keys: tuple[str, str] = ("", "")
) -> list[Message]:
    if not question:
        raise Drop("missing instruction", f"'{keys[0]}' is empty or absent; expected the question text")
    if not answer:
        raise Drop("missing answer", f"'{keys[1]}' is empty or absent; expected the answer text")
    user: Message = {"role": "user", "content": question}
    if context:
        user["input"] = context
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, user, {"role": "assistant", "content": answer}]


def _keyed(question: str, answer: str, context: str | None = None) -> Callable[[dict], list[Message]]:
    def convert(data: dict) -> list[Message]:
        ctx = _field_text(data, context) if context else ""
        texts = _field_text(data, question), _field_text(data, answer)
        return _pair(*texts, ctx, _field_text(data, "system"), keys=(question, answer))

    return convert


def _chat(key: str, role_key: str, content_key: str, with_tools: bool = False) -> Callable[[dict], list[Message]]:
    """A converter of a column of turns; ``with_tools``: the row's ``tools`` and ``system`` columns too."""

    def convert(data: dict) -> list[Message]:
        turns = data.get(key)
        if isinstance(turns, str):  # CSV cells hold JSON text
            try:
                turns = json.loads(turns)
            except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can parse
                raise Drop(f"'{key}' is not valid JSON", f"'{key}' must be a JSON list of turns: {e}") from e
        if not isinstance(turns, list) or not turns:
            expected = f"expected a non-empty list of {{{role_key}, {content_key}}} objects"
            raise Drop(f"empty or missing '{key}'", f"'{key}' is {_kind(turns)}; {expected}")
        try:
            messages = [_turn(t, role_key, content_key) for t in turns]
        except AttributeError as e:
            bad = next(i for i, t in enumerate(turns, 1) if not isinstance(t, dict))
            reason = f"'{key}' items must be objects with {role_key}/{content_key}"
            raise Drop(reason, f"'{key}' turn {bad} is {_kind(turns[bad - 1])}; expected an object") from e
        while messages and messages[-1]["role"] not in ("assistant", "gpt", "bot", "model", "chatgpt"):
            messages.pop()  # a trailing question without an answer teaches nothing
        if not messages:
            raise Drop("missing answer", f"'{key}' has no turn from the assistant")
        try:
            conversation = normalize(_with_row_tools(messages, data) if with_tools else messages)
        except ThinkingOnly as e:
            raise Drop("answer is only thinking", f"'{key}': {e}") from e
        except DataError as e:
            raise Drop(f"invalid conversation: {e}", f"'{key}': {e}") from e
        for i, message in enumerate(conversation, 1):
            check_encodable(message["content"] + message.get("reasoning_content", ""), f"'{key}' turn {i}")
        return conversation

    return convert


def _turn(turn: dict, role_key: str, content_key: str) -> dict:
    """A turn as a message: its role and content, the tool and reasoning fields, a ShareGPT function_call turn
    (its value the JSON of a call, or of a list of calls) as an assistant message with tool_calls."""
    role, content = turn.get(role_key), turn.get(content_key)
    if str(role).lower() == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": content}
    extra = {k: turn[k] for k in ("tool_calls", "reasoning_content", "tool_call_id", "name") if turn.get(k) is not None}
    return {"role": role, "content": content, **extra}


def _with_row_tools(messages: list[dict], data: dict) -> list[dict]:
    """The turns with the row's ``system`` column (when they have no system turn) and its ``tools`` on it."""
    try:
        tools = parse_tools(data.get("tools"), "'tools'")
    except DataError as e:
        raise Drop("'tools' is not a list of tool schemas", str(e)) from e
    system = _field_text(data, "system")
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "tools": tools}, *messages[1:]]
    return [{"role": "system", "content": system, "tools": tools}, *messages] if system or tools else messages


def _kind(value: Any) -> str:
    """'absent or null', 'an empty list', 'an object', ... for messages about a field's value."""
    if value is None:
        return "absent or null"
    if isinstance(value, list) and not value:
        return "an empty list"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"a {type(value).__name__}")


def _user_assistant_text(data: dict) -> list[Message]:
    from aift.data.formats import UserAssistantFormat

    text = _field_text(data, "text")
    if not text:
        raise Drop("missing text", "'text' is empty or absent; expected a <|user|>...<|assistant|>... dialogue")
    try:
        return UserAssistantFormat().parse_conversation(text)
    except DataError as e:
        hint = "for raw text (continued pretraining) use --task pretrain"
        raise Drop(f"text is not a <|user|>...<|assistant|>... dialogue: {e}", hint) from e


# Detection tries the shapes in this order.
SHAPES = {
    "openai_tools": Shape(
        ("messages", "tools"),
        (),
        _chat("messages", "role", "content", with_tools=True),
        "messages + tools (OpenAI tool calling: assistant tool_calls, tool results)",
    ),
    "sharegpt_tools": Shape(
        ("conversations", "tools"),
        ("system",),
        _chat("conversations", "from", "value", with_tools=True),
        "conversations + tools (ShareGPT function_call/observation turns, LLaMA-Factory)",
    ),
    "messages": Shape(
        ("messages",), (), _chat("messages", "role", "content"), "messages (role/content; reasoning_content or <think>)"
    ),
    "sharegpt": Shape(
        ("conversations",), (), _chat("conversations", "from", "value"), "conversations (from/value, ShareGPT)"
    ),
    "alpaca": Shape(
        ("instruction", "output"),
        ("input", "system"),
        _keyed("instruction", "output", "input"),
        "instruction/input/output (alpaca)",
    ),
    "dolly": Shape(
        ("instruction", "response"),
        ("context", "system"),
        _keyed("instruction", "response", "context"),
        "instruction/context/response (dolly)",
    ),
    "prompt_completion": Shape(
        ("prompt", "completion"), ("system",), _keyed("prompt", "completion"), "prompt/completion"
    ),
    "qa": Shape(
        ("question", "answer"), ("context", "system"), _keyed("question", "answer", "context"), "question/answer"
    ),
    "qa_ja": Shape(("質問", "回答"), ("入力", "system"), _keyed("質問", "回答", "入力"), "質問/回答"),
    "user_assistant_text": Shape(
        ("text",), (), _user_assistant_text, "text (<|user|>...<|endoftext|>\\n<|assistant|>...<|endoftext|> dialogues)"
    ),
}
# The answer column each question column needs, to name what is missing.
_ANSWER_FOR = {
    "instruction": "'output' (alpaca) or 'response' (dolly)",
    "prompt": "'completion'",
    "question": "'answer'",
    "質問": "'回答'",
}


def _missing_answer(columns: set[str]) -> str:
    question = next((q for q in _ANSWER_FOR if q in columns), None)
    return f" (has '{question}' but no answer column {_ANSWER_FOR[question]})" if question else ""


SFT_SHAPES = ShapeTable("data", SHAPES, _missing_answer)
# Hub sources have a fixed schema; wizardlm also comes as ShareGPT conversations (its V2 release).
HUB_SHAPES = {"alpaca": ("alpaca",), "dolly": ("dolly",), "wizardlm": ("alpaca", "sharegpt")}


# ---------------------------------------------------------------------------------------------- local files


def source_for_path(path: str | Path) -> str:
    """The file source (json, jsonl, csv, parquet) for a file name."""
    source = _SUFFIX_SOURCE.get(Path(path).suffix.lower())
    if source is None:
        raise DataError(f"cannot tell the file type of {path}; pass --source ({', '.join(FILE_SOURCES)})")
    return source


def _check_path(path: str | Path | None, source: str) -> Path:
    if path is None:
        raise DataError(f"--source {source} needs --source-path FILE")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    return path


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:  # permission denied, a broken network share, ...
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        utf16 = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{path} is not UTF-8{utf16} (line {line}, byte {e.start}); save it as UTF-8") from e
    if not text.strip():
        raise DataError(f"{path} is empty")
    return text


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """json.loads, with every way it fails (syntax, nesting, huge numbers) as a DataError naming file and line."""
    where = f"on line {line}" if line else "at line {lineno}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? use --source jsonl)" if "Extra data" in e.msg and not line else ""
        at = where.format(lineno=e.lineno)
        raise DataError(f"{path}: malformed JSON {at}, column {e.colno}: {e.msg}{hint}") from e
    except RecursionError as e:
        at = f" on line {line}" if line else ""
        raise DataError(f"{path}: JSON{at} is nested too deeply to read; expected rows of text fields") from e
    except ValueError as e:  # an integer with more digits than Python converts (sys.get_int_max_str_digits)
        match = re.search(rf"\d{{{sys.get_int_max_str_digits() + 1},}}", text)
        lineno = line or (text.count("\n", 0, match.start()) + 1 if match else "?")
        raise DataError(f"{path}: malformed JSON on line {lineno}: {e.args[0].split(';')[0]}") from e


def _read_json(path: Path) -> list[Row]:
    data = _parse_json(_read_text(path), path)
    if not isinstance(data, list):
        hint = " (one object per line? use --source jsonl)" if isinstance(data, dict) else ""
        raise DataError(f"{path}: expected a JSON array of objects, found a {type(data).__name__}{hint}")
    rows = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} of the array is a {type(item).__name__}, expected an object")
        rows.append(Row(item, f"row {i}"))
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    # Only \n ends a JSON Lines record: str.splitlines() would also cut at U+2028 and other characters
    # that JSON allows inside strings.
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        item = _parse_json(line, path, line=number)
        if not isinstance(item, dict):
            raise DataError(f"{path}: line {number} is a {type(item).__name__}, expected an object")
        rows.append(Row(item, f"line {number}"))
    return rows


def _read_csv(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV header (line 1): {e}") from e
    if not any(columns):
        raise DataError(f"{path}: no header row")
    try:
        rows = [Row({k.strip(): v for k, v in r.items() if k}, f"line {reader.line_num}") for r in reader]
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV at line {reader.line_num}: {e}") from e
    if not rows:
        raise DataError(f"{path}: has a header but no rows")
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    return [Row(r, f"row {i}") for i, r in enumerate(table.to_pylist(), 1)]


_READERS = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


def read_file(path: str | Path, source: str | None = None) -> list[Row]:
    """Rows of a local file; ``source`` (json, jsonl, csv, parquet) defaults to the file's suffix."""
    path = _check_path(path, source or "json")
    rows = _READERS[source or source_for_path(path)](path)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


# ------------------------------------------------------------------------------------------------ hub sources


def load_hub_dataset(source: str, source_path: str | Path | None = None):
    """The hub dataset behind a source as a ``datasets.Dataset`` (split train), or a local copy in its schema."""
    import datasets

    if source_path is not None:
        path = _check_path(source_path, source)
        _check_json_syntax(path, source_for_path(path))
        builder = source_for_path(path).replace("jsonl", "json")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad file
            raise DataError(f"{path}: cannot be read as {builder} in the {source} schema: {e}") from e
    from aift.models.loading import hub_reachable

    repo = HUB_DATASETS[source]
    offline_cache = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    advice = (
        f"cannot download {repo} (--source {source}): the Hugging Face hub cannot be reached. "
        f"Download the data where there is a network and pass the file: --source json --source-path FILE "
        f"(or --source {source} --source-path FILE for a copy in {repo}'s own columns)"
    )
    if not offline_cache and not hub_reachable():
        raise DataError(advice)
    try:
        return datasets.load_dataset(repo, split="train")
    except Exception as e:  # noqa: BLE001 - offline, not cached, or a hub error: one message for all
        raise DataError(f"{advice}. ({type(e).__name__}: {e})") from e


def _check_json_syntax(path: Path, file_source: str) -> None:
    """Parses a JSON/JSONL file once with Python's json before Arrow reads it.

    Arrow's JSON reader crashes the process (segmentation fault) on nesting tens of thousands deep, where
    Python's parser stops with an error that names the line.
    """
    if file_source == "json":
        _parse_json(_read_text(path), path)
    elif file_source == "jsonl":
        for number, line in enumerate(_read_text(path).split("\n"), 1):
            if line.strip():
                _parse_json(line, path, line=number)


def hub_rows(source: str, dataset, origin: str | None = None) -> tuple[list[Row], str]:
    """Rows and shape of a hub-schema ``datasets.Dataset``; DataError when its columns are not that schema."""
    origin = f"{origin} (--source {source})" if origin else f"--source {source}"
    shape = SFT_SHAPES.detect(dataset.column_names, origin, HUB_SHAPES[source])
    return [Row(r, f"row {i}") for i, r in enumerate(dataset, 1)], shape


# ------------------------------------------------------------------------------------------------ conversions


def to_conversations(rows: list[Row], shape: str, origin: str, strict: bool = False) -> Loaded:
    """Converts rows of an SFT shape; rows that cannot be converted are counted by reason (or raise with strict)."""
    return convert_rows(rows, SFT_SHAPES, shape, origin, strict)


def load_conversations(
    source: str | None, source_path: str | Path | None = None, num_samples: int | None = None, strict: bool = False
) -> Loaded:
    """Reads a source into conversations (``examples``): `load_rows` with SFT's shapes."""
    return load_rows(SFT_SHAPES, source, source_path, num_samples, strict)


def load_rows(
    table: ShapeTable,
    source: str | None,
    source_path: str | Path | None = None,
    num_samples: int | None = None,
    strict: bool = False,
) -> Loaded:
    """Reads a source, detects its shape in a task's table and converts its rows into the task's examples.

    Args:
        table: The task's shapes.
        source: One of SOURCES, or None to take the file type from ``source_path``.
        source_path: A local file (required for file sources; for hub sources a local copy in the hub schema).
        num_samples: Use only the first N rows.
        strict: Raise on the first row that cannot be used instead of dropping it.

    Returns:
        The examples, where each came from, the detected shape and counts.
    """
    if source is None:
        source = source_for_path(_check_path(source_path, "json"))
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source in HUB_DATASETS and source_path is None:
        dataset = load_hub_dataset(source)
        total = len(dataset)
        if num_samples is not None and num_samples < total:
            dataset = dataset.select(range(num_samples))
        origin = HUB_DATASETS[source]
        shape = table.detect(dataset.column_names, f"{origin} (--source {source})", HUB_SHAPES[source])
        rows = [Row(r, f"row {i}") for i, r in enumerate(dataset, 1)]
    else:
        # A local copy in a hub dataset's columns is read by aift's own readers, like any local file, not by
        # Arrow's JSON reader through datasets.load_dataset, which can crash the process on a malformed file.
        hub_copy = source in HUB_DATASETS
        rows = read_file(source_path, None if hub_copy else source)
        total = len(rows)
        origin = str(source_path)
        columns = {k for r in rows[:100] for k in r.data}
        if hub_copy:
            shape = table.detect(columns, f"{origin} (--source {source})", HUB_SHAPES[source])
        else:
            shape = table.detect(columns, origin)
        rows = rows[:num_samples] if num_samples is not None else rows
    if num_samples is not None and num_samples > total:
        log.info("note: --num-samples %d is more than the %d rows of %s; using all of them", num_samples, total, origin)
    loaded = convert_rows(rows, table, shape, origin, strict)
    loaded.total_available = total
    return loaded
