"""`aift bench`: the same data trained by aift and by TRL, each in a fresh process, measured the same way."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aift.bench import report
from aift.bench.data import load_rows, synthetic_rows
from aift.bench.peak import model_flops
from aift.errors import AiftError

log = logging.getLogger(__name__)

# Every lever on: what aift does by default in the benchmark.
ALL_LEVERS = {"bf16": True, "packing": True, "frozen_base_bf16": True, "loss_chunk_size": 1024, "torch_compile": False}
# Ablation runs: name -> the levers that differ from ALL_LEVERS (tcmalloc is the process's allocator).
ABLATION = {
    "without packing (length-grouped padding)": {"packing": False},
    "without fused cross-entropy": {"loss_chunk_size": 0},
    "without frozen base in bf16": {"frozen_base_bf16": False},
    "without bf16 autocast (fp32)": {"bf16": False, "frozen_base_bf16": False},
    "without tcmalloc": {"tcmalloc": False},
}


class BenchError(AiftError, RuntimeError):
    """A benchmark run failed; the message names the run and where its log is."""


@dataclass
class BenchOptions:
    """What to benchmark; defaults are those of the committed result."""

    model: str = "smollm2-135m-instruct"
    method: str = "lora"  # lora | qlora | full
    seq_len: int = 512
    examples: int = 96
    eval_examples: int | None = None  # default: a third of examples, at most 32
    batch_size: int = 8
    learning_rate: float = 2e-4
    compare: str | None = None  # "trl" or None
    output: str = "bench/results/latest"
    data: str | None = None  # JSON/JSONL rows; default: the synthetic instruction set
    ablation: bool = False
    compile: bool = False
    tcmalloc: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("lora", "qlora", "full"):
            raise AiftError(f"--method must be lora, qlora or full; got {self.method!r}")
        if self.compare not in (None, "trl"):
            raise AiftError(f"--compare accepts only 'trl'; got {self.compare!r}")
        for name in ("seq_len", "examples", "batch_size"):
            if getattr(self, name) <= 0:
                raise AiftError(f"--{name.replace('_', '-')} must be positive")
        if self.eval_examples is None:
            self.eval_examples = max(2, min(32, self.examples // 3))


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Runs the benchmark, writes result.json, results.md and chart.png into options.output; returns the result."""
    from aift.models.loading import resolve_model_path

    output = Path(options.output)
    model_dir = resolve_model_path(options.model)
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="aift-bench-") as tmp:
        work = Path(tmp)
        data_file = _write_data(options, work / "data.json")
        base_spec = {
            "model": model_dir,
            "method": options.method,
            "data": str(data_file),
            "seq_len": options.seq_len,
            "batch_size": options.batch_size,
            "learning_rate": options.learning_rate,
            "seed": options.seed,
        }
        logs = output / "logs"
        levers = {**ALL_LEVERS, "torch_compile": options.compile}
        if options.method == "full":
            levers["frozen_base_bf16"] = False  # a full fine-tune has no frozen base
        aift_spec = {**base_spec, "trainer": "aift", "levers": levers, "measure_peak": True}
        aift = _run("aift", aift_spec, work, logs, options.tcmalloc)
        peak = aift.pop("peak")
        trl = _run("trl", {**base_spec, "trainer": "trl"}, work, logs, tcmalloc=False) if options.compare else None
        ablation = _ablation(options, base_spec, levers, work, logs) if options.ablation else []
    result = assemble(options, model_dir, peak, aift, trl, ablation, load_before)
    report.write_all(result, output)
    return result


def _ablation(options: BenchOptions, base_spec: dict, levers: dict, work: Path, logs: Path) -> list[dict]:
    rows = []
    for name, change in ABLATION.items():
        if options.method == "full" and "frozen_base_bf16" in change:
            continue  # a full fine-tune has no frozen base
        changed = {k: v for k, v in change.items() if k != "tcmalloc"}
        spec = {**base_spec, "trainer": "aift", "levers": {**levers, **changed}}
        tag = "ablation-" + "-".join(change)
        run = _run(tag, spec, work, logs, tcmalloc=options.tcmalloc and change.get("tcmalloc", True))
        rows.append({"name": name, **run})
    return rows


def _write_data(options: BenchOptions, path: Path) -> Path:
    rows = load_rows(options.data) if options.data else synthetic_rows(seed=options.seed)
    needed = options.examples + options.eval_examples
    if len(rows) < needed:
        raise AiftError(
            f"{options.data or 'the synthetic set'} has {len(rows)} rows; --examples {options.examples} plus "
            f"{options.eval_examples} held-out rows need {needed}"
        )
    split = {"train": rows[: options.examples], "eval": rows[options.examples : needed]}
    path.write_text(json.dumps(split), encoding="utf-8")
    return path


def _run(tag: str, spec: dict, work: Path, logs: Path, tcmalloc: bool) -> dict[str, Any]:
    """Runs one worker process, its output shown and kept in logs/TAG.log; returns its result."""
    spec_file, result_file = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    logs.mkdir(parents=True, exist_ok=True)
    env = _worker_env(tcmalloc)
    log.info("bench: running %s (%s)", tag, "tcmalloc" if "libtcmalloc" in env.get("LD_PRELOAD", "") else "malloc")
    command = [sys.executable, "-m", "aift.bench.worker", str(spec_file), str(result_file)]
    with open(logs / f"{tag}.log", "wb") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            log_file.write(chunk)
        code = process.wait()
    if code != 0 or not result_file.is_file():
        raise BenchError(f"the {tag} run failed (exit code {code}); see {logs / f'{tag}.log'}")
    return json.loads(result_file.read_text(encoding="utf-8"))


def _worker_env(tcmalloc: bool) -> dict[str, str]:
    """This process's environment, with tcmalloc preloaded or removed as asked."""
    from aift.utils.launch import find_tcmalloc

    env = dict(os.environ)
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "libtcmalloc" not in p]
    library = find_tcmalloc() if tcmalloc else None
    if library:
        preload.insert(0, library)
    env["LD_PRELOAD"] = ":".join(preload)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


FLOPS_FORMULA = (
    "k * (P_body * tokens + P_head * scored_tokens), k = 4 for LoRA/QLoRA (forward 2, backward to activations 2), "
    "6 for full fine-tuning; P_body = matmul weights below the output head, P_head = V x H; attention scores left out"
)


def assemble(options, model_dir, peak, aift, trl, ablation, load_before) -> dict[str, Any]:
    """The result dict: every run's figures, the ratios and the targets, settings and environment."""
    peak_flops = {"bf16": peak["bf16_gflops"], "fp32": peak["fp32_gflops"]}
    scored = aift["tokens"] - options.examples  # each example's first token has no target
    flops = model_flops(peak["body_params"], peak["head_params"], aift["tokens"], scored, options.method == "full")
    result: dict[str, Any] = {
        "aift": aift,
        "trl": trl,
        "mfu": flops / aift["train_time_s"] / (peak_flops["bf16"] * 1e9),
        "matmul_peak_gflops": peak_flops,
        "flops_formula": FLOPS_FORMULA,
        "model_matmul_params": {"body": peak["body_params"], "head": peak["head_params"]},
        "ablation": ablation,
        "settings": {
            **asdict(options),
            "model_name": options.model,
            "model_dir": model_dir,
            "data": options.data or "synthetic instruction set (seed 0)",
        },  # fmt: skip
        "environment": environment(load_before),
    }
    if trl:
        result["speedup"] = aift["tokens_per_s"] / trl["tokens_per_s"]
        result["memory_ratio"] = aift["peak_mem_gb"] / trl["peak_mem_gb"]
        result["eval_loss_ratio"] = aift["eval_loss"] / trl["eval_loss"]
        result["eval_loss_gap"] = abs(result["eval_loss_ratio"] - 1)
    result["targets"] = report.target_rows(result)
    return result


def environment(load_before: list[float]) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
        "load_before": load_before,
        "load_after": _load_average(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
