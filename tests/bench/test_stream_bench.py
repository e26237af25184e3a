"""bench/stream/run.py on a tiny corpus: the corpus is generated as asked, one pass reads all of it, the training
run streams, and the result (JSON, table, chart) is written; the corpus is removed unless --keep."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("stream_bench", REPO / "bench" / "stream" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_corpus_has_both_kinds_and_the_size_asked(bench, tmp_path):
    made = bench.generate_corpus(tmp_path / "c", 600_000, seed=3)
    files = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert sum(1 for f in files if f.endswith(".jsonl")) == bench.JSONL_FILES and any(f.endswith(".txt") for f in files)
    assert made["bytes"] == sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file()) >= 600_000
    again = bench.generate_corpus(tmp_path / "d", 600_000, seed=3)
    assert again == made and (tmp_path / "c/part-00.jsonl").read_bytes() == (tmp_path / "d/part-00.jsonl").read_bytes()
    line = json.loads((tmp_path / "c/part-00.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert any("\u3040" <= ch <= "\u30ff" for ch in line["text"])  # kana: Japanese-like text


@pytest.mark.slow  # a 2-step `aift train` subprocess: 24 s at load 1.5 on 2 cores (576 s at load 11)
def test_bench_streams_the_whole_corpus_and_a_training_run(bench, tmp_path, tiny_model_dir):
    out, corpus = tmp_path / "out", tmp_path / "corpus"
    argv = ["--corpus-gb", "0.0002", "--corpus-dir", str(corpus), "--model", str(tiny_model_dir), "--max-length",
            "256", "--sample-every", "20", "--warmup-mb", "0.1", "--train-steps", "2", "--train-max-length", "64",
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    stream, train = result["stream"], result["train"]
    assert stream["bytes_read"] == result["corpus"]["bytes"]  # one whole pass
    assert stream["stats"]["passes"] == 1 and stream["stats"]["blocks"] > 20
    assert stream["stats"]["documents"] == sum(result["corpus"]["documents"].values()) - 4
    assert stream["rss_peak_mb"] >= stream["rss_end_mb"] > 0 and stream["growth_mb_per_gb"] is not None
    assert len(train["losses"]) == 2 and train["stream"]["blocks"] == 2 and train["rss_peak_mb"] > 0
    assert "| RSS at start |" in (out / "results.md").read_text() and (out / "chart.png").stat().st_size > 1000
    assert not (corpus / "corpus").exists() and not (corpus / "prepared").exists()
