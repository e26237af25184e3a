"""`aift bench --optimizer X[,Y...]` (#26.5): aift's run per optimizer, its speed, peak memory and optimizer state."""

from __future__ import annotations

import json

import pytest

from aift.bench.core import BenchOptions, assemble, optimizer_rows, parse_optimizers
from aift.bench.report import markdown, summary_line
from aift.bench.worker import aift_config, optimizer_state_mb
from aift.cli import build_parser, main
from aift.errors import AiftError
from aift.training.checkpoint import MANIFEST_FILE


def test_the_optimizer_list_is_checked():
    assert parse_optimizers("adamw, muon") == ["adamw", "muon"]
    assert BenchOptions().optimizer == ["adamw"]  # the committed results' optimizer
    assert BenchOptions(optimizer="adamw_8bit").optimizer == ["adamw_8bit"]
    with pytest.raises(AiftError, match="--optimizer takes distinct names of adamw, .*sgd; got 'adam'"):
        parse_optimizers("adam")
    with pytest.raises(AiftError, match="distinct"):
        parse_optimizers("muon,muon")


def test_the_flag_reaches_the_options_and_the_worker_config(tmp_path):
    args = build_parser("bench").parse_args(["--optimizer", "sgd,muon"])
    assert BenchOptions(optimizer=args.optimizer).optimizer == ["sgd", "muon"]
    spec = {"model": "m", "learning_rate": 1e-3, "batch_size": 2, "seq_len": 64, "seed": 0, "optimizer": "muon",
            "gradient_checkpointing": False, "levers": {"packing": False, "bf16": False, "loss_chunk_size": 0,
            "torch_compile": False, "frozen_base_bf16": False}}  # fmt: skip
    assert aift_config(spec, [[1, 2, 3]], tmp_path).optimizer == "muon"


def test_the_dpo_bench_refuses_an_optimizer(capsys):
    assert main(["bench", "--method", "dpo", "--optimizer", "muon"]) == 2
    assert "--optimizer is for the SFT bench" in capsys.readouterr().err


def test_the_optimizer_state_is_read_from_the_last_checkpoint(tmp_path):
    for step, size in ((1, 100), (2, 2_500_000)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").write_bytes(b"x" * size)
        (folder / MANIFEST_FILE).write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir()  # unfinished: no manifest, not read
    assert optimizer_state_mb(tmp_path) == 2.5
    assert optimizer_state_mb(tmp_path / "nothing") is None


def _run(optimizer: str, tokens_per_s: float, mem: float, state_mb: float) -> dict:
    return {"optimizer": optimizer, "tokens": 1000, "train_time_s": 1000 / tokens_per_s, "tokens_per_s": tokens_per_s,
            "steps": 3, "peak_mem_gb": mem, "optimizer_state_mb": state_mb, "final_train_loss": 2.1,
            "eval_loss": 2.0, "allocator": "tcmalloc"}  # fmt: skip


def test_a_table_per_optimizer_in_results_md():
    runs = [_run("adamw", 500, 2.0, 40.0), _run("adamw_8bit", 400, 1.5, 10.0), _run("muon", 450, 1.8, 20.0)]
    rows = optimizer_rows(runs)
    assert [r["optimizer"] for r in rows] == ["adamw", "adamw_8bit", "muon"]
    assert rows[1]["speed_vs_first"] == pytest.approx(0.8) and rows[1]["memory_vs_first"] == pytest.approx(0.75)
    peak = {"bf16_gflops": 800.0, "fp32_gflops": 200.0, "body_params": 100_000_000, "head_params": 28_000_000}
    result = assemble(BenchOptions(examples=10), "/m", peak, runs[0], None, [], [0.1, 0.2, 0.3])
    result["scaling"], result["optimizers"] = [], rows
    text = markdown(result)
    assert "## Optimizers" in text
    assert "| adamw_8bit | 400 | 0.80x | 1.50 | 0.75x | 10.0 | 2.1000 | 2.0000 |" in text
    assert "adamw_8bit 400 tok/s, 1.50 GB; muon 450 tok/s, 1.80 GB" in summary_line(result)
    result["optimizers"] = rows[:1]
    assert "## Optimizers" not in markdown(result)  # one optimizer: the main table says it all
    json.dumps(result)  # result.json stays plain JSON
