"""The data page's forms reach the library calls `aift prepare`'s flags make: --drop-earlier-thinking, raw text
from a folder or a glob, --mix and --streaming (--eval-documents) through the HTTP route give the dataset that
the CLI gives; the Train form offers the optimizers and schedules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from webui_server import REPO

from aift.cli import main
from aift.config import LR_SCHEDULERS, OPTIMIZERS, ConfigError
from aift.data.prepared import read_prepared
from aift.webui import runs


@pytest.fixture(scope="module")
def scratch(server) -> Path:
    """The server's scratch data folder with examples/reasoning.jsonl and the brewery corpus in it."""
    folder = server.data_dirs[-1]
    shutil.copy(REPO / "examples" / "reasoning.jsonl", folder / "reasoning.jsonl")
    shutil.copytree(REPO / "examples" / "pretrain" / "corpus", folder / "corpus", dirs_exist_ok=True)
    return folder


def _from_page(server, name: str, source_path: str, options: dict) -> Path:
    status, body = server.request("/api/prepare", {"source_path": source_path, "name": name, "options": options})
    assert status == 200, body
    return Path(body["path"])


def _from_cli(tmp_path: Path, *flags: str) -> Path:
    out = tmp_path / "cli"
    assert main(["prepare", *flags, "--output-dir", str(out)]) == 0
    return out


def _assert_same(page: Path, cli: Path) -> dict:
    """The same prepare.json and the same rows in each split; returns prepare.json."""
    (page_data, page_info), (cli_data, cli_info) = read_prepared(page), read_prepared(cli)
    assert page_info == cli_info
    assert {s: page_data[s].to_dict() for s in page_data} == {s: cli_data[s].to_dict() for s in cli_data}
    return page_info


def test_drop_earlier_thinking_box_is_the_flag(server, scratch, tmp_path):
    options = {"task": "sft", "max_length": "256", "val_ratio": "0.25", "drop_earlier_thinking": True}
    page = _from_page(server, "reasoning", "reasoning.jsonl", options)
    source = str(scratch / "reasoning.jsonl")
    flags = ["--source-path", source, "--max-length", "256", "--val-ratio", "0.25", "--drop-earlier-thinking"]
    assert _assert_same(page, _from_cli(tmp_path, *flags))["drop_earlier_thinking"] is True


def test_raw_text_from_a_folder_or_a_glob(server, scratch, tmp_path):
    options = {"task": "pretrain", "max_length": "64", "val_ratio": "0.25"}
    page = _from_page(server, "brewery-md", "corpus/*.md", options)
    flags = ["--task", "pretrain", "--source", "text", "--max-length", "64", "--val-ratio", "0.25"]
    info = _assert_same(page, _from_cli(tmp_path, *flags, "--source-path", str(scratch / "corpus" / "*.md")))
    md_files = len(list((scratch / "corpus").glob("*.md")))
    assert info["documents"]["kept"] == md_files < len(list((scratch / "corpus").iterdir()))
    folder = json.loads((_from_page(server, "brewery-all", "corpus", options) / "prepare.json").read_text())
    assert folder["documents"]["kept"] == len(list((scratch / "corpus").iterdir()))
    for outside in ("*.md", "corpus/../../*.md", "../*/corpus/*.md"):
        status, body = server.request("/api/prepare", {"source_path": outside, "name": "x", "options": options})
        assert status == 400, (outside, body)


def test_mixture_rows_are_the_datasets_list(server, scratch, tmp_path):
    rows = [
        {"path": "corpus", "task": "pretrain", "weight": "0.5", "samples": "", "split": "auto"},
        {"path": "reasoning.jsonl", "task": "sft", "weight": "", "samples": "3", "split": "train"},
    ]
    options = {"task": "sft", "max_length": "128", "val_ratio": "0.25", "mix": rows}
    page = _from_page(server, "mixed", "", options)
    mix = tmp_path / "mix.yaml"
    listed = [
        {"path": str(scratch / "corpus"), "task": "pretrain", "weight": 0.5, "split": "auto"},
        {"path": str(scratch / "reasoning.jsonl"), "task": "sft", "samples": 3, "split": "train"},
    ]
    mix.write_text(yaml.safe_dump({"datasets": listed}), encoding="utf-8")
    info = _assert_same(page, _from_cli(tmp_path, "--mix", str(mix), "--max-length", "128", "--val-ratio", "0.25"))
    assert [(s["task"], s["drawn"]) for s in info["mixture"]][1] == ("sft", 3)
    status, body = server.request("/api/prepare", {"source_path": "reasoning.jsonl", "name": "m2", "options": options})
    assert status == 400 and "leave the data file empty" in body["error"]


def test_streaming_box_records_the_corpus_and_the_run_needs_max_steps(server, scratch, tmp_path):
    options = {"task": "pretrain", "max_length": "64", "streaming": True, "eval_documents": "2", "val_ratio": ""}
    page = _from_page(server, "streamed", "corpus", options)
    flags = ["--task", "pretrain", "--streaming", "--eval-documents", "2", "--max-length", "64"]
    info = _assert_same(page, _from_cli(tmp_path, *flags, "--source-path", str(scratch / "corpus")))
    assert info["counts"]["test"] == 2 and "streaming" in info
    run = {"name": "streamed-run", "method": "sft", "adapter": "lora", "training": {"dataset_path": str(page)}}
    status, body = server.request("/api/runs", run)
    assert status == 400 and "max_steps" in body["error"]
    assert not (server.runs_dir / "streamed-run").exists()


def test_train_form_offers_the_optimizers_and_schedules(server):
    _, options = server.request("/api/options")
    fields = {f["name"]: f for f in options["fields"]["training"]}
    assert fields["optimizer"]["choices"] == list(OPTIMIZERS)
    assert fields["lr_scheduler"]["choices"] == list(LR_SCHEDULERS) and fields["lr_scheduler"]["default"] is None
    request = runs.build_request("lora", {"dataset_path": "d", "optimizer": "muon", "lr_scheduler": "wsd"}, None)
    assert (request["optimizer"], request["lr_scheduler"]) == ("muon", "wsd")
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        runs.build_request("lora", {"dataset_path": "d", "optimizer": "adam"}, None)
