"""`aift bench`: the same data trained by aift and by TRL, each in a fresh process, measured the same way.

`--nproc N` runs aift's training in N processes (torchrun, DDP over gloo on CPU); `--nproc 1,2` runs each count
on the same data and adds a scaling table (tokens/s, speedup, efficiency). `--optimizer muon` trains aift's run
with that optimizer; `--optimizer adamw,adamw_8bit,muon` runs each on the same data and adds a table of speed,
peak memory and optimizer state per optimizer.
"""

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
from aift.bench.measure import bench_precision
from aift.bench.peak import model_flops
from aift.config import OPTIMIZERS
from aift.errors import AiftError

log = logging.getLogger(__name__)

# Every lever on: what aift does by default in the benchmark.
ALL_LEVERS = {
    "bf16": True,
    "packing": True,
    "frozen_base_bf16": True,
    "loss_chunk_size": 1024,
    "fused_lora": True,
    "segment_attention": True,
    "fused_ops": False,  # off until this ablation, on a quiet machine, decides (their rows switch them on alone)
    "fused_projections": False,
    "torch_compile": False,
}
# Ablation runs: name -> the levers that differ from ALL_LEVERS (tcmalloc is the process's allocator).
ABLATION = {
    "without packing (length-grouped padding)": {"packing": False},
    "without fused cross-entropy": {"loss_chunk_size": 0},
    "without frozen base in bf16": {"frozen_base_bf16": False},
    "without bf16 autocast (fp32)": {"bf16": False, "frozen_base_bf16": False},
    "without tcmalloc": {"tcmalloc": False},
    "without fused LoRA layers (peft's)": {"fused_lora": False},
    "without segment attention (SDPA, 4-D mask)": {"segment_attention": False},
    "with fused RMSNorm, SwiGLU and rotary": {"fused_ops": True},
    "with fused q/k/v and gate/up GEMMs": {"fused_projections": True},
}


def bench_levers(method: str, precision: str, compile: bool = False) -> dict[str, Any]:
    """aift's levers in the bench's main run: every one that applies to the method and the precision."""
    levers = {**ALL_LEVERS, "torch_compile": compile}
    if method == "full":
        levers["frozen_base_bf16"] = False  # a full fine-tune has no frozen base
    if precision == "fp32":  # the bf16 levers do not apply (and their ablation rows are skipped)
        levers.update(bf16=False, frozen_base_bf16=False)
    return levers


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
    nproc: list[int] | int | str = 1  # processes of aift's run; a list (e.g. "1,2") runs each and a scaling table
    # The same for aift and TRL: on is both trainers' default (TRL's SFTConfig, aift train), so the headline
    # measures what users get; `--gradient-checkpointing off` measures both without the recompute.
    gradient_checkpointing: bool | str = True  # or "selective": aift's (TRL then runs its full checkpointing)
    # Both trainers alike: auto = bf16 where the device has it in hardware, else fp32 (measure.bench_precision).
    precision: str = "auto"
    # aift's optimizer (TrainingConfig.optimizer); a list (e.g. "adamw,muon") runs each and a table per optimizer.
    optimizer: list[str] | str = "adamw"

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
        self.nproc = parse_nproc(self.nproc)
        self.optimizer = parse_optimizers(self.optimizer)
        if self.compare and self.nproc[0] != 1:
            raise AiftError("--compare trl trains TRL in one process: start --nproc with 1 (e.g. --nproc 1,2)")


def parse_nproc(value: list[int] | int | str) -> list[int]:
    """--nproc 2 or --nproc 1,2 -> [2] or [1, 2]: positive, distinct, in the order given."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    try:
        counts = [int(str(item).strip()) for item in items]
    except ValueError:
        raise AiftError(f"--nproc takes a number or a comma-separated list like 1,2; got {value!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise AiftError(f"--nproc needs distinct process counts >= 1; got {value!r}")
    return counts


def parse_optimizers(value: list[str] | str) -> list[str]:
    """--optimizer muon or --optimizer adamw,muon -> ["muon"] or ["adamw", "muon"]: known, distinct, in order."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if not names or unknown or len(set(names)) != len(names):
        raise AiftError(f"--optimizer takes distinct names of {', '.join(OPTIMIZERS)}; got {value!r}")
    return names


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Runs the benchmark, writes result.json, results.md and chart.png into options.output; returns the result."""
    from aift.models.loading import resolve_model_path

    output = Path(options.output)
    model_dir = resolve_model_path(options.model)
    load_before = load_average()
    precision = bench_precision(options.precision)
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
            "gradient_checkpointing": options.gradient_checkpointing,
            "bf16": precision == "bf16",
            "optimizer": options.optimizer[0],
        }
        logs = output / "logs"
        levers = bench_levers(options.method, precision, options.compile)
        aift_spec = {**base_spec, "trainer": "aift", "levers": levers}
        runs = [_run_aift(n, aift_spec, work, logs, options.tcmalloc) for n in options.nproc]
        peak = next((run.pop("peak") for run in runs if "peak" in run), None)
        if peak is None:  # no 1-process run measured it: the machine's peak, in a process with every core
            peak = _run("peak", {**base_spec, "trainer": "none", "measure_peak": True}, work, logs, options.tcmalloc)
            peak = peak["peak"]
        aift = runs[0]
        by_optimizer = [aift] + [
            _run_aift(options.nproc[0], {**aift_spec, "optimizer": name}, work, logs, options.tcmalloc)
            for name in options.optimizer[1:]
        ]  # fmt: skip
        trl = _run("trl", {**base_spec, "trainer": "trl"}, work, logs, tcmalloc=False) if options.compare else None
        ablation = _ablation(options, base_spec, levers, work, logs) if options.ablation else []
    result = assemble(options, model_dir, peak, aift, trl, ablation, load_before, precision)
    result["scaling"] = scaling_rows(runs)
    result["optimizers"] = optimizer_rows(by_optimizer)
    report.write_all(result, output)
    return result


def _run_aift(nproc: int, spec: dict, work: Path, logs: Path, tcmalloc: bool) -> dict[str, Any]:
    """aift's run in `nproc` processes, the ranks' figures combined; a 1-process run also measures the peak."""
    tag = "aift" if nproc == 1 else f"aift-nproc{nproc}"
    if spec["optimizer"] != "adamw":
        tag += f"-{spec['optimizer']}"
    spec = {**spec, "nproc": nproc, "output_dir": str(work / f"run-{tag}"), "measure_peak": nproc == 1}
    return combine_ranks(_run_ranks(tag, spec, work, logs, tcmalloc, nproc))


def _run_ranks(tag: str, spec: dict, work: Path, logs: Path, tcmalloc: bool, nproc: int) -> list[dict[str, Any]]:
    """Each rank's result: through _run for one process, under torchrun for several."""
    if nproc == 1:
        return [_run(tag, spec, work, logs, tcmalloc)]
    return _run_processes(tag, spec, work, logs, tcmalloc, nproc)


# Per-rank figures kept in result.json (the rest is the same on every rank or only meaningful on rank 0).
RANK_FIELDS = ("rank", "train_time_s", "peak_mem_gb", "process_wall_time_s", "threads", "allocator")


def combine_ranks(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures from its ranks' results.

    tokens: real (non-padding) tokens of all ranks, which aift's loop sums over ranks every step, so each rank
    reports the same total; train time: the slowest rank's; peak memory: the largest rank's (peak_mem_gb) and
    the sum over ranks (what the machine held at most, if all peaked together).
    """
    ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
    first = ranks[0]
    totals = {r["tokens"] for r in ranks}
    if len(totals) != 1:
        raise BenchError(f"the ranks disagree on the tokens trained ({sorted(totals)}): the run is not DDP")
    slowest = max(r["train_time_s"] for r in ranks)
    combined = {
        **first,
        "nproc": len(ranks),
        "train_time_s": slowest,
        "tokens_per_s": first["tokens"] / slowest,
        "peak_mem_gb": max(r["peak_mem_gb"] for r in ranks),
        "peak_mem_gb_sum": sum(r["peak_mem_gb"] for r in ranks),
        "ranks": [{k: r.get(k) for k in RANK_FIELDS} for r in ranks],
    }
    combined.pop("rank", None)
    combined.pop("world_size", None)
    return combined


def scaling_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokens/s per process count, speedup over the fewest processes, and efficiency (speedup per process)."""
    base = min(runs, key=lambda r: r["nproc"])
    rows = []
    for run in runs:
        speedup = run["tokens_per_s"] / base["tokens_per_s"]
        rows.append({
            "nproc": run["nproc"],
            "tokens": run["tokens"],
            "tokens_per_s": run["tokens_per_s"],
            "speedup": speedup,
            "speedup_vs_nproc": base["nproc"],
            "efficiency": speedup * base["nproc"] / run["nproc"],
            "train_time_s": run["train_time_s"],
            "steps": run["steps"],
            "peak_mem_gb_max": run["peak_mem_gb"],
            "peak_mem_gb_sum": run["peak_mem_gb_sum"],
            "eval_loss": run["eval_loss"],
            "ranks": run["ranks"],
        })  # fmt: skip
    return rows


OPTIMIZER_FIELDS = ("tokens_per_s", "peak_mem_gb", "optimizer_state_mb", "train_time_s", "steps", "final_train_loss",
                    "eval_loss")  # fmt: skip


def optimizer_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed, peak memory and optimizer state per optimizer; tokens/s and memory also relative to the first."""
    base = runs[0]
    return [
        {
            "optimizer": run["optimizer"],
            **{k: run.get(k) for k in OPTIMIZER_FIELDS},
            "speed_vs_first": run["tokens_per_s"] / base["tokens_per_s"],
            "memory_vs_first": run["peak_mem_gb"] / base["peak_mem_gb"] if base["peak_mem_gb"] else None,
        }
        for run in runs
    ]


def _ablation(options: BenchOptions, base_spec: dict, levers: dict, work: Path, logs: Path) -> list[dict]:
    rows = []
    for name, change in ABLATION.items():
        if options.method == "full" and "frozen_base_bf16" in change:
            continue  # a full fine-tune has no frozen base
        if options.method != "lora" and ("fused_lora" in change or "fused_projections" in change):
            continue  # the fused layer is for unquantized LoRA only
        changed = {k: v for k, v in change.items() if k != "tcmalloc"}
        if changed and all(levers[k] == v for k, v in changed.items()):
            continue  # the lever is already off in the main run
        spec = {**base_spec, "trainer": "aift", "levers": {**levers, **changed}, "nproc": options.nproc[0]}
        tag = "ablation-" + "-".join(change)
        spec["output_dir"] = str(work / f"run-{tag}")
        tcmalloc = options.tcmalloc and change.get("tcmalloc", True)
        run = combine_ranks(_run_ranks(tag, spec, work, logs, tcmalloc, spec["nproc"]))
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
    return _run_processes(tag, spec, work, logs, tcmalloc, 1)[0]


def _run_processes(tag: str, spec: dict, work: Path, logs: Path, tcmalloc: bool, nproc: int) -> list[dict[str, Any]]:
    """Runs the worker in `nproc` processes (torchrun when more than one), output kept in logs/TAG.log."""
    from aift.bench.worker import result_path_of

    spec_file, result_file = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    logs.mkdir(parents=True, exist_ok=True)
    env = worker_env(tcmalloc)
    allocator = "tcmalloc" if "libtcmalloc" in env.get("LD_PRELOAD", "") else "malloc"
    log.info("bench: running %s (%s, %d process%s)", tag, allocator, nproc, "" if nproc == 1 else "es")
    command = worker_command(nproc, spec_file, result_file)
    result_files = [result_path_of(result_file, r, nproc) for r in range(nproc)]
    with open(logs / f"{tag}.log", "wb") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            log_file.write(chunk)
        code = process.wait()
    if code != 0 or not all(f.is_file() for f in result_files):
        raise BenchError(f"the {tag} run failed (exit code {code}); see {logs / f'{tag}.log'}")
    return [json.loads(f.read_text(encoding="utf-8")) for f in result_files]


def worker_command(nproc: int, spec_file: Path, result_file: Path) -> list[str]:
    """The worker as one plain process, or under torchrun with `nproc` processes on a free local port."""
    worker = ["-m", "aift.bench.worker", str(spec_file), str(result_file)]
    if nproc == 1:
        return [sys.executable, *worker]
    from aift.distributed.launch import find_free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={find_free_port()}",
        "--max-restarts=0",
        *worker,
    ]


def worker_env(tcmalloc: bool) -> dict[str, str]:
    """This process's environment, with tcmalloc preloaded or removed as asked."""
    from aift.utils.allocator import find_tcmalloc

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


def assemble(options, model_dir, peak, aift, trl, ablation, load_before, precision="bf16") -> dict[str, Any]:
    """The result dict: every run's figures, the ratios and the targets, settings and environment.

    MFU is taken against the matmul peak of the precision both runs trained in.
    """
    peak_flops = {"bf16": peak["bf16_gflops"], "fp32": peak["fp32_gflops"]}
    peak_sizes = {"bf16": peak.get("bf16_size", 2048), "fp32": 2048}
    scored = aift["tokens"] - options.examples  # each example's first token has no target
    flops = model_flops(peak["body_params"], peak["head_params"], aift["tokens"], scored, options.method == "full")
    result: dict[str, Any] = {
        "aift": aift,
        "trl": trl,
        "precision": precision,
        "mfu": flops / aift["train_time_s"] / (peak_flops[precision] * 1e9),
        "matmul_peak_gflops": peak_flops,
        "matmul_peak_sizes": peak_sizes,
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
        "load_after": load_average(),
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


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# The instruction sets that decide this CPU's fp32/bf16 matmul speed, as the benches report them.
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []
