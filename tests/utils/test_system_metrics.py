"""The system metrics sampler (context manager and scripts/collect_metrics.sh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aift.utils.system_metrics import SystemMetricsSampler, metrics_path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "collect_metrics.sh"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sampler_writes_lines_with_process_tree_rss(tmp_path):
    ballast = bytearray(64 * 1024 * 1024)  # 64 MB this process holds: RSS must be at least that
    with SystemMetricsSampler(tmp_path, interval=0.05) as sampler:
        deadline = time.monotonic() + 30
        while sampler.samples_written < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = _lines(tmp_path / "system_metrics.jsonl")
    assert len(lines) >= 4  # three while running, one on exit
    assert len(ballast) and all(line["rss_gb"] > 64 / 1024 for line in lines)
    times = [line["time"] for line in lines]
    assert times == sorted(times)
    for line in lines:
        assert 0 <= line["cpu_percent"] <= 100 and line["mem_used_gb"] > 0 and line["proc_cpu_percent"] >= 0
        assert line["gpu_util_percent"] == [] and line["gpu_mem_gb"] == []  # no GPU here


def test_sampler_counts_child_processes(tmp_path):
    script = "b = bytearray(200 * 2**20); print('ready', flush=True); import time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with SystemMetricsSampler(tmp_path / "own.jsonl", interval=0.05) as sampler:
            while sampler.samples_written < 1:
                time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert min(line["rss_gb"] for line in _lines(tmp_path / "own.jsonl")) > 0.2


def test_metrics_path():
    assert metrics_path("out/run") == Path("out/run/system_metrics.jsonl")
    assert metrics_path("x/m.jsonl") == Path("x/m.jsonl")
    with pytest.raises(ValueError, match="interval"):
        SystemMetricsSampler("x", interval=0)


def test_collect_metrics_script_runs_a_command_and_returns_its_code(tmp_path):
    code = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            str(tmp_path),
            "--interval",
            "0.1",
            "--",
            sys.executable,
            "-c",
            "import time, sys; time.sleep(0.6); sys.exit(3)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert code.returncode == 3, code.stderr
    lines = _lines(tmp_path / "system_metrics.jsonl")
    assert len(lines) >= 2 and "rss_gb" in lines[0]


def test_collect_metrics_script_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(tmp_path), "--interval", "0.1"], stderr=subprocess.PIPE, text=True
    )
    target = tmp_path / "system_metrics.jsonl"
    deadline = time.monotonic() + 60
    while (not target.exists() or len(target.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    lines = _lines(target)
    assert len(lines) >= 2 and "rss_gb" not in lines[0]  # machine-wide only: no process watched
