"""aift.utils.files: a failed write leaves the old file (and folder) intact and no temp litter; the readers."""

from __future__ import annotations

import json
import os
import stat

import pytest

from aift.errors import AiftError
from aift.utils import files
from aift.utils.files import (
    FileFormatError,
    atomic_folder,
    read_json_object,
    read_jsonl,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    write_text_atomic(path, "新しい")
    assert path.read_text(encoding="utf-8") == "新しい"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_written_file_has_the_default_mode(tmp_path):
    """Like any other write (the umask applies), not mkstemp's private 0600: reports are meant to be shared."""
    umask = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a.png", b"\x89PNG")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_crash_mid_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "summary.json"
    path.write_text('{"old": true}')

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, failing, crash)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_json_defaults_keep_unicode_and_indent(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"a": "東京"})
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{\n  "a": "東京"\n}\n'
    write_json_atomic(tmp_path / "r.json", {"a": "東京"}, indent=None, ensure_ascii=True)
    assert (tmp_path / "r.json").read_text() == '{"a": "\\u6771\\u4eac"}\n'


# ---------------------------------------------------------------- atomic_folder


def test_folder_appears_whole_on_success(tmp_path):
    final = tmp_path / "export"
    with atomic_folder(final) as tmp:
        assert tmp.parent == tmp_path and not final.exists()
        (tmp / "model.safetensors").write_bytes(b"w")
    assert (final / "model.safetensors").read_bytes() == b"w"
    assert os.listdir(tmp_path) == ["export"]


def test_folder_swap_on_error_leaves_the_old_folder(tmp_path):
    final = tmp_path / "prepared"
    final.mkdir()
    (final / "prepare.json").write_text("old")
    with pytest.raises(RuntimeError, match="tokenizer broke"), atomic_folder(final, replace=True) as tmp:
        (tmp / "prepare.json").write_text("new")
        raise RuntimeError("tokenizer broke")
    assert (final / "prepare.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["prepared"]


def test_folder_swap_replaces_the_old_contents(tmp_path):
    final = tmp_path / "prepared"
    final.mkdir()
    (final / "stale.arrow").write_text("old")
    with atomic_folder(final, replace=True) as tmp:
        (tmp / "prepare.json").write_text("new")
    assert os.listdir(final) == ["prepare.json"]
    assert os.listdir(tmp_path) == ["prepared"]


def test_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "config.json").write_text("old")
    real_replace = os.replace

    def refuse_the_new_folder(src, dst):
        if ".tmp-" in str(src):
            raise OSError(18, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", refuse_the_new_folder)
    with pytest.raises(OSError, match="cross-device"), atomic_folder(final, replace=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (final / "config.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["merged"]


def test_non_empty_target_refused_before_any_work_without_replace(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("mine")
    with pytest.raises(AiftError, match="exists and is not empty"), atomic_folder(final):
        pytest.fail("the block must not run")
    assert (final / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- reading


def test_read_json_object_names_the_file_and_what_was_expected(tmp_path):
    path = tmp_path / "prepare.json"
    path.write_text("{ half")
    with pytest.raises(FileFormatError, match=r"prepare\.json: the prepared dataset's info is not valid JSON"):
        read_json_object(path, "prepared dataset's info")
    path.write_text("[1, 2]")
    with pytest.raises(FileFormatError, match="should be a JSON object, not a list"):
        read_json_object(path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(FileFormatError, match="not UTF-8"):
        read_json_object(path)
    path.write_text('{"ok": 1}')
    assert read_json_object(path) == {"ok": 1}


def test_half_written_last_line_is_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_broken_middle_line_is_an_error_with_its_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(FileFormatError, match=r"metrics\.jsonl: line 2 is not JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(FileFormatError, match="line 2 is not a JSON object"):
        read_jsonl(path)


def test_on_bad_line_skips_and_describes_each_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n[1, 2]\n{"step": 4}\n{"ste')
    seen = []
    assert read_jsonl(path, on_bad_line=seen.append) == [{"step": 1}, {"step": 4}]
    assert seen[0].startswith("line 2 is not JSON")
    assert seen[1:] == ["line 3 is not a JSON object", "last line truncated"]


def test_a_secret_is_never_readable_by_others(tmp_path, monkeypatch):
    created = []
    real_open = os.open
    monkeypatch.setattr(
        files.os, "open", lambda p, flags, mode=0o777: created.append(mode) or real_open(p, flags, mode)
    )
    write_text_atomic(tmp_path / "token", "hf_x", mode=0o600)
    assert created[0] == 0o600  # from creation on, not chmod-ed afterwards
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
