"""`aift eval`, `aift report` and scripts/generate_report.py driven from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aift.cli import main

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "eval"))  # the schema builders shared with tests/eval
from eval_fixtures import QA, train_tiny_adapter, write_prepared, write_run  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer) -> Path:
    return write_prepared(tmp_path_factory.mktemp("cli-eval") / "ds", tokenizer, QA, QA)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """A training output dir whose final/ is a (briefly) trained LoRA adapter on the tiny model."""
    run = write_run(tmp_path_factory.mktemp("cli-run") / "run")
    train_tiny_adapter(tiny_model_dir, tokenizer, run / "final", steps=5)
    return run


def test_eval_compare_base_writes_json_and_prints_table(run_dir, dataset, capsys):
    out = run_dir / "eval.json"
    argv = ["eval", "--model", str(run_dir), "--dataset-path", str(dataset), "--compare-base", "--generate"]
    code = main([*argv, "--max-samples", "4", "--max-new-tokens", "4", "--batch-size", "2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["examples"] == 4 and result["adapter"] == str(run_dir / "final")
    for name in ("loss", "perplexity", "exact_match", "chrf", "rouge_l"):
        assert result["delta"][name] == pytest.approx(result["metrics"][name] - result["base_metrics"][name])
    assert result["delta"]["loss"] < 0  # five steps on these very rows
    assert "difference" in printed and "better" in printed and "sample answers" in printed
    assert f"wrote {out}" in printed


def test_eval_without_output_prints_json_line(tiny_model_dir, dataset, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset-path", str(dataset), "--max-samples", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["metrics"]["examples"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset-path", "/nonexistent/ds"], "not a prepared dataset"),
        (["--max-samples", "0"], "--max-samples must be at least 1"),
        (["--split", "validation"], "no split 'validation'"),
    ],
)
def test_eval_errors_exit_2_with_message(tiny_model_dir, dataset, capsys, extra, message):
    argv = ["eval", "--model", str(tiny_model_dir), "--dataset-path", str(dataset), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("aift eval: error:") and message in err and "Traceback" not in err


def test_report_cli_and_script(run_dir, tmp_path, capsys):
    results = tmp_path / "results"
    write_run(results / "crashed", complete=False, truncate_last_line=True)
    (results / "run").symlink_to(run_dir)
    assert main(["report", str(results), "--output", str(tmp_path / "report")]) == 0
    page = tmp_path / "report" / "report.html"
    assert f"wrote {page}" in capsys.readouterr().out
    html = page.read_text(encoding="utf-8")
    assert "incomplete" in html and "ROUGE-L" in html  # eval.json of the run above is in the table
    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_report.py"), str(results), "--output", str(tmp_path / "r2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert script.returncode == 0, script.stderr
    assert (tmp_path / "r2" / "report.html").is_file() and (tmp_path / "r2" / "loss.png").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
