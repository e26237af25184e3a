"""Fuzzed loaders: JSON, JSONL and CSV files in every row shape, broken in every way a user's file can be broken.

Random bytes, other encodings (UTF-16, Latin-1, Shift_JIS), truncation, deep nesting, huge lines and cells,
lone surrogates, and wrong types (null, numbers, booleans, lists, objects) in each field. Every case must end
in a DataError that names the file, or in conversations that are all well-formed (rows that cannot be used
are dropped and counted): never another exception. A smaller sample drives ``prepare_dataset`` (what
``aift prepare`` calls) end to end: on error nothing is left in the output's parent, on success the dataset
reads back with as many examples as were kept.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aift.data import DataError
from aift.data.sources import SHAPES, load_conversations

MODEL = "smollm2-135m-instruct"
FORMATS = ("json", "jsonl", "csv")
# AIFT_FUZZ_SCALE=10 for a longer local hunt; the suite runs the default.
SCALE = float(os.environ.get("AIFT_FUZZ_SCALE", "1"))
# CI replays the same examples every run (a red CI means a real bug, not luck); locally each run explores anew.
FUZZ = settings(
    deadline=timedelta(seconds=5),
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CHAT_KEYS = {"messages": ("role", "content"), "conversations": ("from", "value")}
ROLES = ("system", "user", "assistant", "human", "gpt", "bot", "tool", "", "USER", "narrator")

# Any character, lone surrogates included (JSON's "\ud800" escapes produce them).
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
plain_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
huge_text = st.integers(20_000, 200_000).map(lambda n: "長い行" * (n // 3))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3), max_leaves=8
)


def field_values(huge: bool):
    """Mostly good text; sometimes a wrong type, a blank, or (when allowed) a huge string."""
    bad = st.one_of(json_values, st.just(""), st.just("   "), *([huge_text] if huge else []))
    return st.one_of(*[plain_text] * 6, bad)


@st.composite
def turns(draw, key: str, huge: bool):
    role_key, content_key = CHAT_KEYS[key]
    turn = st.fixed_dictionaries(
        {role_key: st.sampled_from(ROLES) | json_values, content_key: field_values(huge)},
        optional={"input": field_values(False)},
    )
    alternating = [
        {role_key: ("user", "assistant")[i % 2], content_key: draw(plain_text)} for i in range(draw(st.integers(1, 4)))
    ]
    return draw(st.one_of(st.just(alternating), st.lists(turn | json_values, max_size=4), json_values))


@st.composite
def rows(draw, shape: str, huge: bool):
    required, optional = SHAPES[shape].required, SHAPES[shape].optional
    row = {}
    for key in (*required, *optional):
        if draw(st.integers(0, 9)) == 0 and key not in required[:1]:
            continue  # a missing field
        if key in CHAT_KEYS:
            row[key] = draw(turns(key, huge))
        elif shape == "user_assistant_text":
            good = draw(plain_text), draw(plain_text)
            row[key] = draw(
                st.just(f"<|user|>{good[0]}<|endoftext|>\n<|assistant|>{good[1]}<|endoftext|>") | field_values(huge)
            )
        else:
            row[key] = draw(field_values(huge))
    if draw(st.booleans()):
        row.update(draw(st.dictionaries(any_text, json_values, max_size=2)))
    return row


def _dump(value, ensure_ascii: bool) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)


def _csv_text(shape: str, data: list[dict]) -> str:
    header = [*SHAPES[shape].required, *SHAPES[shape].optional]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in data:
        cells = [row.get(k) for k in header]
        writer.writerow(["" if c is None else c if isinstance(c, str) else _dump(c, False) for c in cells])
    return out.getvalue()


def _encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace" if encoding != "utf-8" else "surrogatepass")


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """Truncation, inserted or replaced bytes, at random places."""
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(("cut", "insert", "replace")))
        junk = draw(st.binary(min_size=1, max_size=4))
        if kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data = data[:at] + junk + data[at:]
        else:
            data = data[:at] + junk + data[at + len(junk) :]
    return data


DEEP = st.sampled_from((50, 1_000, 100_000))


@st.composite
def files(draw, fmt: str, huge: bool = True, max_rows: int = 4, shapes=tuple(SHAPES)) -> tuple[str, bytes]:
    """(shape, file bytes): a file of rows in one shape, then perhaps re-encoded, mutated or replaced."""
    shape = draw(st.sampled_from(sorted(shapes)))
    data = draw(st.lists(rows(shape, huge), min_size=1, max_size=max_rows))
    ensure_ascii = draw(st.booleans())
    if fmt == "json":
        text = _dump(data, ensure_ascii)
    elif fmt == "jsonl":
        text = draw(st.sampled_from(("\n", "\r\n"))).join(_dump(r, ensure_ascii) for r in data) + "\n"
    else:
        text = _csv_text(shape, data)
    kind = draw(st.sampled_from(("clean", "clean", "clean", "mutated", "encoding", "bytes", "deep", "big-int", "top")))
    if kind == "encoding":
        return shape, _encode(text, draw(st.sampled_from(("utf-16", "utf-16-le", "latin-1", "shift_jis", "utf-8-sig"))))
    if kind == "mutated":
        return shape, draw(mutations(_encode(text, "utf-8")))
    if kind == "bytes":
        return shape, draw(st.binary(max_size=64))
    if kind == "deep":
        depth, key = draw(DEEP), draw(st.sampled_from(sorted({*SHAPES[shape].required, "x"})))
        nested = "[" * depth + "]" * depth
        row = f'{{"{key}": {nested}}}'
        if fmt == "json":
            return shape, f"[{row}]".encode()
        if fmt == "jsonl":
            return shape, (row + "\n").encode()
        return shape, f'{key}\n"{nested}"\n'.encode()
    if kind == "big-int":  # more digits than Python's int() accepts by default
        digits = "9" * 5000
        if fmt == "csv":
            return shape, _encode(text, "utf-8") + (digits + "\n").encode()
        return shape, text.replace("null", digits, 1).replace("[", f"[{digits},", 1).encode("utf-8", "surrogatepass")
    if kind == "top":
        value = draw(json_values)
        return shape, (_dump(value, True) + "\n").encode()
    return shape, _encode(text, "utf-8")


def _check_conversations(loaded) -> None:
    assert len(loaded.examples) + sum(loaded.dropped.values()) == loaded.read
    assert len(loaded.wheres) == len(loaded.examples)
    for conversation in loaded.examples:
        roles = [m["role"] for m in conversation]
        turns_ = roles[1:] if roles[0] == "system" else roles
        assert turns_ and turns_ == ["user", "assistant"] * (len(turns_) // 2) and len(turns_) % 2 == 0
        for message in conversation:
            for value in (message["content"], message.get("input", "x")):
                assert isinstance(value, str) and value.strip()
                value.encode("utf-8")  # no lone surrogates reach the tokenizer or Arrow


def _load_or_clear_error(fmt: str, path: Path, strict: bool):
    try:
        loaded = load_conversations(fmt, path, strict=strict)
    except DataError as e:
        assert path.name in str(e), f"the error does not name the file: {e}"
        event(f"error: {str(e).split(': ', 1)[-1][:40]}")
        return None
    _check_conversations(loaded)
    event(f"loaded {min(len(loaded.examples), 2)} kept, {min(sum(loaded.dropped.values()), 2)} dropped")
    return loaded


@pytest.mark.parametrize("fmt", FORMATS)
@settings(FUZZ, max_examples=int(200 * SCALE))
@given(data=st.data())
def test_loaders_end_in_rows_or_a_clear_error(fmt, data):
    shape, content = data.draw(files(fmt))
    strict = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{fmt}"
        path.write_bytes(content)
        _load_or_clear_error(fmt, path, strict)


HUB_FILE_SHAPES = {"alpaca": ("alpaca",), "dolly": ("dolly",), "wizardlm": ("alpaca", "sharegpt")}


@pytest.fixture(scope="module")
def _datasets_cache(tmp_path_factory):
    """datasets.load_dataset caches every file it reads: keep the fuzzed ones out of the user's cache."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


@settings(FUZZ, max_examples=int(30 * SCALE), deadline=timedelta(seconds=20))
@given(data=st.data())
def test_hub_schemas_from_a_local_copy_end_in_rows_or_a_clear_error(_datasets_cache, data):
    """--source alpaca|dolly|wizardlm --source-path FILE goes through datasets.load_dataset, not aift's readers."""
    source = data.draw(st.sampled_from(sorted(HUB_FILE_SHAPES)))
    fmt = data.draw(st.sampled_from(FORMATS))
    shape = data.draw(st.sampled_from(HUB_FILE_SHAPES[source]))
    _, content = data.draw(files(fmt, huge=False, max_rows=3, shapes=(shape,)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{fmt}"
        path.write_bytes(content)
        _load_or_clear_error(source, path, strict=data.draw(st.booleans()))


@pytest.fixture(scope="module")
def _tokenizer_cached(tokenizer):
    """prepare_dataset loads its tokenizer by name; the session fixture has converted the embedded model."""
    return tokenizer


@pytest.mark.slow
@settings(FUZZ, max_examples=int(24 * SCALE), deadline=timedelta(seconds=20))
@given(data=st.data())
def test_prepare_writes_a_readable_dataset_or_nothing(_tokenizer_cached, data):
    from datasets import load_from_disk

    from aift.data.prepare import prepare_dataset

    fmt = data.draw(st.sampled_from(FORMATS))
    _, content = data.draw(files(fmt, huge=False, max_rows=3))
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / f"data.{fmt}", Path(tmp) / "out"
        path.write_bytes(content)
        loaded = _load_or_clear_error(fmt, path, strict=False)
        try:
            prepare_dataset(MODEL, fmt, path, output_dir=out, max_length=64)
        except DataError as e:
            assert path.name in str(e), f"the error does not name the file: {e}"
            assert sorted(p.name for p in Path(tmp).iterdir()) == [path.name], "a failed prepare left files behind"
            return
        assert loaded is not None, "prepare succeeded on a file the loader refuses"
        splits = load_from_disk(str(out))
        info = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
        assert len(splits["train"]) + len(splits["test"]) == info["counts"]["kept"] > 0
        assert sorted(p.name for p in Path(tmp).iterdir()) == sorted([path.name, "out"])
