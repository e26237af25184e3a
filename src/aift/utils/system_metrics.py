"""Samples CPU, memory and (through NVML, where a GPU exists) GPU use every second into system_metrics.jsonl.

    with SystemMetricsSampler("out/run1"):      # writes out/run1/system_metrics.jsonl
        train()

From the shell (what scripts/collect_metrics.sh runs):

    python -m aift.utils.system_metrics out/run1 -- aift train ...   # samples until the command ends
    python -m aift.utils.system_metrics out/run1 --pid 1234          # samples until killed or pid 1234 ends
    python -m aift.utils.system_metrics out/run1                     # machine-wide figures until killed

Each line: `timestamp` (unix seconds), `time` (seconds since sampling began), `cpu_percent` (whole machine,
0-100), `mem_used_gb` (whole machine), `proc_cpu_percent` and `rss_gb` (the watched process and its
children, when one is watched; 100 = one core), `gpu_util_percent` and `gpu_mem_gb` (one entry per GPU, empty without NVML).
Every `_gb` figure is in decimal GB (aift.units), as `peak_mem_gb` in the training logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from aift.units import to_gb

log = logging.getLogger(__name__)

FILE_NAME = "system_metrics.jsonl"  # models.run_folder.SYSTEM_METRICS_FILE names it for a run folder (utils is below)


def metrics_path(path: str | Path) -> Path:
    """A `.jsonl` path is used as is; anything else is a folder that receives system_metrics.jsonl."""
    path = Path(path).expanduser()
    return path if path.suffix == ".jsonl" else path / FILE_NAME


class _GpuProbe:
    """NVML handles for every GPU, or none when pynvml or the driver is missing (then GPU fields stay empty)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # noqa: BLE001 - ImportError or any NVMLError (no driver, no library, no GPU)
            log.debug("no GPU metrics: %s", e)

    def sample(self) -> dict[str, list[float]]:
        util, mem = [], []
        for handle in self.handles:
            util.append(float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            mem.append(to_gb(self._nvml.nvmlDeviceGetMemoryInfo(handle).used))
        return {"gpu_util_percent": util, "gpu_mem_gb": mem}

    def close(self) -> None:
        if self.handles:
            self._nvml.nvmlShutdown()


class _ProcessTree:
    """CPU and RSS of a process and its descendants; keeps Process objects so cpu_percent has a baseline."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self._known: dict[int, psutil.Process] = {}

    def alive(self) -> bool:
        try:
            return self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def sample(self) -> dict[str, float]:
        cpu, rss = 0.0, 0
        try:
            members = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            members = []
        for proc in members:
            proc = self._known.setdefault(proc.pid, proc)
            try:
                cpu += proc.cpu_percent(interval=None)
                rss += proc.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
        return {"proc_cpu_percent": cpu, "rss_gb": to_gb(rss)}


class SystemMetricsSampler:
    """A context manager that appends one JSON line of system metrics every `interval` seconds.

    Args:
        path: A run folder (receives system_metrics.jsonl) or a `.jsonl` file path.
        interval: Seconds between samples.
        pid: The process whose tree's CPU and RSS are recorded (default: this process).
        watch_process: False records only machine-wide figures (no `proc_cpu_percent`, `rss_gb`).
    """

    def __init__(
        self, path: str | Path, interval: float = 1.0, pid: int | None = None, watch_process: bool = True
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive (got {interval})")
        self.path = metrics_path(path)
        self.interval = interval
        self.tree = _ProcessTree(pid or os.getpid()) if watch_process else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples_written = 0

    def __enter__(self) -> SystemMetricsSampler:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.stop()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="aift-system-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops sampling after one last sample, so even a short run has at least one line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        gpu = _GpuProbe()
        psutil.cpu_percent(interval=None)  # baseline: the first reading of a psutil CPU counter is meaningless
        if self.tree is not None:
            self.tree.sample()
        started = time.time()
        try:
            # Line-buffered append: each sample reaches the disk even if the run crashes later.
            with self.path.open("a", encoding="utf-8", buffering=1) as out:
                while not self._stop.wait(self.interval):
                    out.write(json.dumps(self._sample(started, gpu)) + "\n")
                    self.samples_written += 1
                out.write(json.dumps(self._sample(started, gpu)) + "\n")
                self.samples_written += 1
        finally:
            gpu.close()

    def _sample(self, started: float, gpu: _GpuProbe) -> dict[str, Any]:
        now, memory = time.time(), psutil.virtual_memory()
        line: dict[str, Any] = {
            "timestamp": round(now, 3),
            "time": round(now - started, 3),
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem_used_gb": to_gb(memory.total - memory.available),
        }
        if self.tree is not None:
            line.update(self.tree.sample())
        line.update(gpu.sample())
        return line


# ---------------------------------------------------------------- command line (scripts/collect_metrics.sh)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="collect_metrics", description="Sample CPU, RSS and GPU use every second into DIR/system_metrics.jsonl."
    )
    parser.add_argument("dir", help="run folder (or .jsonl file) to append the samples to")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default: 1)")
    parser.add_argument("--pid", type=int, help="watch this process tree; stop when it ends")
    parser.epilog = "Put a command after -- to run it and sample until it ends (its exit code is returned)."
    return parser.parse_args(argv), command


def main(argv: list[str] | None = None) -> int:
    args, command = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.pid and command:
        print("collect_metrics: give either --pid or a command after --, not both", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    child = subprocess.Popen(command) if command else None
    pid = child.pid if child else args.pid
    try:
        sampler = SystemMetricsSampler(args.dir, args.interval, pid=pid, watch_process=pid is not None)
    except psutil.NoSuchProcess:
        print(f"collect_metrics: no process {pid}", file=sys.stderr)
        return 2
    print(f"collect_metrics: sampling every {args.interval:g}s into {sampler.path}", file=sys.stderr)
    with sampler:
        while not stop.wait(0.2):
            if child is not None and child.poll() is not None:
                break
            if sampler.tree is not None and child is None and not sampler.tree.alive():
                break
    if child is not None and child.poll() is None:
        child.terminate()  # we were killed: do not leave the command running unobserved
    return child.wait() if child is not None else 0


if __name__ == "__main__":
    sys.exit(main())
