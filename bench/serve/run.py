"""`aift serve` under load: continuous batching against the static batching of before, then a soak. Each mode
runs in a fresh `python -m aift serve` on the embedded model, driven over HTTP by the official openai client.

    python bench/serve/run.py [--clients 32] [--seconds 300] [--soak-requests 1000] [--out bench/results/serve]

Load: --clients clients stream chat answers one after another for --seconds, prompts of a few to ~250 tokens and
max_tokens 8-128 mixed (clients.py), sampled with a seed per request; the server's --max-batch is the client count.
Reported per mode: requests/s, generated tokens/s (wall time to the last answer), time to first token and
per-token latency after it (p50, p95). Soak (continuous mode, in the same server after its load): --soak-requests
requests, ~10 % hanging up mid-stream and ~5 % malformed; every well-formed one must get its whole answer, every
malformed one a 4xx, the server's RSS must grow under 5 % from the first to the last minute, and no traceback may
reach its log. Writes result.json, results.md and chart.png to --out, with the CPU's flags and the load before
and after: run it on a quiet machine (the full run takes ~15 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from clients import load, soak

from aift.bench.core import cpu_flags, environment, load_average
from aift.models.embedded import embedded_model_dir
from aift.utils.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
MODES = ("continuous", "static")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Server:
    """`python -m aift serve` in a subprocess on a free port, its RSS sampled every second."""

    def __init__(self, mode: str, max_batch: int, log: Path, threads: int | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "aift", "serve", "--model", str(embedded_model_dir())]
        command += ["--served-model-name", "smol", "--port", str(self.port), "--device", "cpu"]
        command += ["--batching", mode, "--max-batch", str(max_batch), "--max-pending", "4096"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        with log.open("w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.samples: list[tuple[float, int]] = []
        self._sampling = threading.Event()

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aift serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    threading.Thread(target=self._sample, daemon=True).start()
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("aift serve did not start")

    def _sample(self) -> None:
        start = time.monotonic()
        while not self._sampling.is_set() and self.proc.poll() is None:
            self.samples.append((time.monotonic() - start, _rss_bytes(self.proc.pid)))
            self._sampling.wait(1.0)

    def rss_since(self, start: float) -> list[tuple[float, int]]:
        """RSS samples from `start` (seconds since the server answered), times made relative to it."""
        return [(t - start, rss) for t, rss in self.samples if t >= start]

    def elapsed(self) -> float:
        return self.samples[-1][0] if self.samples else 0.0

    def __exit__(self, *exc) -> None:
        self._sampling.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")


def rss_growth(samples: list[tuple[float, int]], window: float = 60) -> dict:
    """Mean RSS over the first and the last `window` seconds (a quarter of the run when it is shorter)."""
    span = samples[-1][0] if samples else 0
    window = min(window, span / 4) if span else 0
    first = [rss for t, rss in samples if t <= window]
    last = [rss for t, rss in samples if t >= span - window]
    first_mean, last_mean = sum(first) / len(first), sum(last) / len(last)
    return {
        "window_s": window,
        "first_mb": first_mean / 2**20,
        "last_mb": last_mean / 2**20,
        "growth": last_mean / first_mean - 1,
    }


def run_mode(mode: str, args, logs: Path) -> dict:
    with Server(mode, args.clients, logs / f"serve-{mode}.log", args.threads) as server:
        asyncio.run(load(f"{server.url}/v1", min(2, args.clients), 5))  # warm-up
        result = asyncio.run(load(f"{server.url}/v1", args.clients, args.seconds))
        if mode == "continuous" and args.soak_requests:
            soak_start = server.elapsed()
            result["soak"] = asyncio.run(soak(f"{server.url}/v1", args.clients, args.soak_requests))
            time.sleep(2)  # a last RSS sample after the end
            samples = server.rss_since(soak_start)
            result["soak"]["rss"] = rss_growth(samples)
            result["soak"]["rss_samples"] = [(round(t, 1), rss) for t, rss in samples]
            health = httpx.get(f"{server.url}/health", timeout=30).json()
            result["soak"]["pending_after"] = health["pending"]
            result["stats"] = health["stats"]
    result["tracebacks_in_log"] = server.tracebacks()
    return result


def targets(result: dict) -> list[dict]:
    cont, static = result["modes"].get("continuous"), result["modes"].get("static")
    rows = []
    if cont and static:
        speed = cont["generated_tokens_per_s"] / static["generated_tokens_per_s"]
        ttft = cont["ttft_p95_s"] / static["ttft_p95_s"]
        rows += [
            {"target": "generated tokens/s vs static >= 1.5x", "value": speed, "met": speed >= 1.5},
            {"target": "p95 time to first token vs static <= 0.5x", "value": ttft, "met": ttft <= 0.5},
        ]
    soaked = (cont or {}).get("soak")
    if soaked:
        well_formed = {k: v for k, v in soaked["by_kind"].items() if k != "malformed"}
        rows += [
            {"target": "every request answered as asked", "value": soaked["all_ok"], "met": soaked["all_ok"]},
            {
                "target": "well-formed requests: all full answers",
                "value": f"{sum(v['ok'] for v in well_formed.values())}/{sum(v['sent'] for v in well_formed.values())}",
                "met": all(v["ok"] == v["sent"] for v in well_formed.values()),
            },
            {
                "target": "RSS growth first to last minute < 5 %",
                "value": soaked["rss"]["growth"],
                "met": soaked["rss"]["growth"] < 0.05,
            },
            {
                "target": "no traceback in the log",
                "value": cont["tracebacks_in_log"],
                "met": cont["tracebacks_in_log"] == 0,
            },
        ]
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# aift serve under load ({result['environment']['date']})",
        "",
        f"{s['clients']} clients, {s['seconds']} s per mode, embedded SmolLM2-135M-Instruct fp32 on CPU "
        f"(`--max-batch {s['clients']}`); CPU flags {', '.join(result['cpu_flags'])}; load average before "
        f"{result['environment']['load_before']}, after {result['environment']['load_after']}.",
        "",
        "| mode | requests/s | generated tokens/s | TTFT p50 / p95 (s) | per-token p50 / p95 (ms) | requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, m in result["modes"].items():
        lines.append(
            f"| {mode} | {m['requests_per_s']:.2f} | {m['generated_tokens_per_s']:.1f} | "
            f"{m['ttft_p50_s']:.2f} / {m['ttft_p95_s']:.2f} | "
            f"{1000 * m['per_token_p50_s']:.0f} / {1000 * m['per_token_p95_s']:.0f} | {m['requests']} |"
        )
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    for row in result["targets"]:
        value = f"{row['value']:.2f}" if isinstance(row["value"], float) else str(row["value"])
        lines.append(f"| {row['target']} | {value} | {'yes' if row['met'] else 'no'} |")
    soaked = result["modes"].get("continuous", {}).get("soak")
    if soaked:
        kinds = ", ".join(f"{k} {v['ok']}/{v['sent']}" for k, v in soaked["by_kind"].items())
        rss = soaked["rss"]
        lines += [
            "",
            f"Soak: {soaked['requests']} requests in {soaked['wall_s']:.0f} s ({kinds}); RSS {rss['first_mb']:.0f} MB "
            f"in the first {rss['window_s']:.0f} s, {rss['last_mb']:.0f} MB in the last ({100 * rss['growth']:+.1f} %).",
        ]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    soaked = result["modes"].get("continuous", {}).get("soak")
    fig, axes = plt.subplots(1, 3 if soaked else 2, figsize=(11 if soaked else 7.5, 3.6))
    values = [result["modes"][m]["generated_tokens_per_s"] for m in modes]
    bars = axes[0].bar(modes, values, color=["#2a7ab0", "#b0b0b0"][: len(modes)])
    axes[0].bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    axes[0].set_title("generated tokens/s", fontsize=9)
    for offset, q in ((-0.2, 50), (0.2, 95)):
        ttft = [result["modes"][m][f"ttft_p{q}_s"] for m in modes]
        axes[1].bar([i + offset for i in range(len(modes))], ttft, width=0.4, label=f"p{q}")
    axes[1].set_xticks(range(len(modes)), modes)
    axes[1].set_title("time to first token (s)", fontsize=9)
    axes[1].legend(fontsize=8)
    if soaked:
        t, rss = zip(*soaked["rss_samples"], strict=True)
        axes[2].plot(t, [r / 2**20 for r in rss], color="#2a7ab0")
        axes[2].set_xlabel("s into the soak")
        axes[2].set_title("server RSS during the soak (MB)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300, help="load per mode")
    parser.add_argument("--soak-requests", type=int, default=1000, help="0: no soak")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: torch's, the cores)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serve")
    args = parser.parse_args()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    modes = {mode: run_mode(mode, args, logs) for mode in args.modes}
    result = {
        "settings": {
            "clients": args.clients,
            "seconds": args.seconds,
            "soak_requests": args.soak_requests,
            "server_threads": args.threads,
        },
        "cpu_flags": cpu_flags(),
        "environment": environment(load_before),
        "modes": modes,
    }
    result["targets"] = targets(result)
    write_text_atomic(args.out / "result.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(args.out / "results.md", markdown(result))
    chart(result, args.out / "chart.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
