"""The HTML report: runs found in parent dirs, charts embedded and written, crashed runs shown, Chromium renders it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from eval_fixtures import BENCH_RESULT, write_run
from optional_pieces import require
from PIL import Image

from aift.eval.report import ReportError, build_report, discover_runs, load_run, run_row

EVAL_JSON = {
    "model": "smollm2-135m-instruct",
    "split": "test",
    "examples": 6,
    "metrics": {"loss": 1.2, "perplexity": 3.32, "exact_match": 0.5, "chrf": 41.5, "rouge_l": 0.61},
    "base_metrics": {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.0, "chrf": 20.0, "rouge_l": 0.3},
    "delta": {"loss": -0.8, "perplexity": -4.07, "exact_match": 0.5, "chrf": 21.5, "rouge_l": 0.31},
    "samples": [{"prompt": "<q>", "reference": "東京です。", "finetuned": "東京です。", "base": "大阪"}],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results/ with two complete runs, one crashed run (no summary, truncated last line) and a bench result."""
    root = tmp_path_factory.mktemp("results")
    write_run(root / "lora", eval_json=EVAL_JSON)
    write_run(root / "full", method="full", steps=12, start_loss=3.5)
    write_run(root / "crashed", complete=False, truncate_last_line=True, steps=7, system_metrics=False)
    (root / "bench" / "lora-vs-trl").mkdir(parents=True)
    (root / "bench" / "lora-vs-trl" / "result.json").write_text(json.dumps(BENCH_RESULT))
    (root / "notes").mkdir()  # not a run: ignored
    return root


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    return build_report([results], tmp_path_factory.mktemp("report"))


def test_runs_are_found_below_a_parent_dir(results):
    names = sorted(run.name for run in discover_runs([results]))
    assert names == ["bench/lora-vs-trl", "crashed", "full", "lora"]


def test_crashed_run_is_read_with_what_it_has(results):
    run = load_run(results / "crashed")
    assert run.incomplete and run.summary is None
    assert [r["step"] for r in run.train] == list(range(1, 7))  # the truncated 7th line is dropped
    assert any("last line truncated" in p for p in run.problems)
    row = run_row(run)
    assert row["status"] == "incomplete"
    assert row["steps"] == 6 and row["tokens"] == 6 * 512  # from metrics.jsonl (cumulative tokens)
    assert row["method"] == "lora"  # from final/aift_meta.json
    assert row["final_eval_loss"] == pytest.approx(run.evals[-1]["eval_loss"])


def test_complete_run_row_uses_summary_and_eval_json(results):
    row = run_row(load_run(results / "lora"))
    summary = json.loads((results / "lora" / "train_summary.json").read_text())
    assert row["status"] == "complete"
    assert row["tokens_per_s"] == summary["train_tokens_per_s"]
    assert row["final_train_loss"] == summary["final_train_loss"]
    assert row["eval_chrf"] == 41.5 and row["delta_loss"] == -0.8


def test_report_files_and_html(report):
    folder = report.parent
    expected = {"loss.png", "learning_rate.png", "tokens_per_s.png", "memory.png", "system_metrics.png", "bench.png"}
    assert expected <= {p.name for p in folder.iterdir()}
    page = report.read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(expected)
    # the embedded images are the PNGs written beside the page
    assert base64.b64decode(embedded[0]) == (folder / "loss.png").read_bytes()
    assert 'id="runs"' in page and 'id="bench"' in page
    assert "crashed" in page and 'class="incomplete"' in page
    assert "東京です。" in page and "&lt;q&gt;" in page  # samples shown, escaped
    assert "last line truncated" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_loss_chart_is_drawn(report):
    pixels = np.asarray(Image.open(report.parent / "loss.png").convert("RGB"), dtype=float)
    assert pixels.shape[0] > 200 and pixels.std() > 10
    # matplotlib's C0..C2 line colours appear (one per run)
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(pixels - colour).sum(axis=2) < 30).sum() > 50, colour


def test_damaged_files_do_not_crash(tmp_path):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 2.0}\nnot json\n[1, 2]\n\n')
    (run / "train_summary.json").write_text("{ half")
    (run / "eval.json").write_bytes(b"\xff\xfe garbage")
    (run / "system_metrics.jsonl").write_text('{"timestamp": 5, "cpu_percent": "n/a"}\n')
    page = build_report([run], tmp_path / "out")
    text = page.read_text(encoding="utf-8")
    assert "incomplete" in text and "line 2 is not JSON" in text and "train_summary.json unreadable" in text
    assert (tmp_path / "out" / "loss.png").is_file()


def test_empty_or_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no run found"):
        build_report([tmp_path / "empty"], tmp_path / "out")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(report, tmp_path):
    require(_chromium() is not None, "headless Chromium is not installed (apt-get install -y chromium)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2000", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 20, "the screenshot is blank"
    # the loss chart's lines are on screen, so images were decoded and drawn, not only the text
    assert (np.abs(pixels - (31, 119, 180)).sum(axis=2) < 30).sum() > 50
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert '<table id="runs">' in dom and dom.count("<img") == 6
    assert re.search(r"<td[^>]*>crashed</td>", dom)
