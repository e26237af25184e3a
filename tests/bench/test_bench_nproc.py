"""`aift bench --nproc`: aift's run in several processes (torchrun, DDP over gloo), figures summed over ranks."""

from __future__ import annotations

import json

import pytest

from aift.bench.core import BenchOptions, combine_ranks, scaling_rows
from aift.cli import main
from aift.errors import AiftError


@pytest.fixture(scope="module")
def scaling_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-nproc") / "run"
    argv = ["bench", "--model", str(tiny_model_dir), "--examples", "5", "--eval-examples", "2", "--seq-len", "64",
            "--batch-size", "2", "--nproc", "1,2", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_processes_train_the_same_tokens_as_one(scaling_run):
    _, result = scaling_run
    one, two = result["scaling"]
    assert (one["nproc"], two["nproc"]) == (1, 2) and result["aift"]["nproc"] == 1
    assert two["tokens"] == one["tokens"] > 0  # same data, each example seen once, padding ranks not counted
    assert [r["rank"] for r in two["ranks"]] == [0, 1]
    assert all(r["peak_mem_gb"] > 0 and r["threads"] == 1 for r in two["ranks"])  # the 2 cores split between ranks
    slowest = max(r["train_time_s"] for r in two["ranks"])
    assert two["tokens_per_s"] == pytest.approx(two["tokens"] / slowest)
    assert two["peak_mem_gb_sum"] == pytest.approx(sum(r["peak_mem_gb"] for r in two["ranks"]))
    assert two["peak_mem_gb_max"] == max(r["peak_mem_gb"] for r in two["ranks"])
    assert two["speedup"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert two["eval_loss"] > 0 and one["eval_loss"] > 0


@pytest.mark.slow
def test_scaling_report_is_written(scaling_run):
    out, result = scaling_run
    assert result["aift"]["levers"]["loss_chunk_size"] > 0  # the fused loss runs under DDP too
    text = (out / "results.md").read_text()
    assert "## Scaling over processes" in text and "| 2 | " in text
    assert (out / "scaling.png").stat().st_size > 0 and (out / "chart.png").is_file()
    assert (out / "logs" / "aift-nproc2.log").is_file()


def _rank(rank: int, train_time_s: float, peak: float, tokens: int = 300) -> dict:
    return {"rank": rank, "tokens": tokens, "train_time_s": train_time_s, "tokens_per_s": tokens / train_time_s,
            "peak_mem_gb": peak, "eval_loss": 2.0 if rank == 0 else None, "steps": 3}  # fmt: skip


def test_ranks_combine_into_one_run():
    run = combine_ranks([_rank(1, 3.0, 1.5), _rank(0, 2.0, 1.0)])
    assert run["nproc"] == 2 and run["tokens"] == 300
    assert run["train_time_s"] == 3.0 and run["tokens_per_s"] == 100.0  # all tokens over the slowest rank
    assert run["peak_mem_gb"] == 1.5 and run["peak_mem_gb_sum"] == 2.5
    assert run["eval_loss"] == 2.0 and [r["rank"] for r in run["ranks"]] == [0, 1]
    with pytest.raises(AiftError, match="disagree"):
        combine_ranks([_rank(0, 1.0, 1.0), _rank(1, 1.0, 1.0, tokens=200)])
    rows = scaling_rows([combine_ranks([_rank(0, 2.0, 1.0)]), run])
    assert rows[1]["speedup"] == pytest.approx(100 / 150) and rows[1]["efficiency"] == pytest.approx(100 / 300)


def test_nproc_values_are_checked(tmp_path, capsys):
    assert BenchOptions(nproc="1, 2").nproc == [1, 2] and BenchOptions(nproc=2).nproc == [2]
    for bad in ("0", "1,1", "two"):
        assert main(["bench", "--nproc", bad, "--output", str(tmp_path / "x")]) == 2
        assert "--nproc" in capsys.readouterr().err
    assert main(["bench", "--nproc", "2", "--compare", "trl", "--output", str(tmp_path / "x")]) == 2
    assert "start --nproc with 1" in capsys.readouterr().err
