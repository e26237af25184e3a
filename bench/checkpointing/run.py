"""Gradient checkpointing off, selective and full on the bench's aift run: step time and peak memory.

    python bench/checkpointing/run.py [--repeats 2] [--steps 3] [--out bench/results/checkpointing]

The bench's configuration (`make bench`'s aift run: the embedded model, LoRA r=16 all-linear, the synthetic
instruction set, packing with segment attention, fused LoRA layers, the fused chunked cross-entropy, fp32 on a
CPU without bf16), trained with ``gradient_checkpointing`` false, "selective" and true.

- Speed: in this one process, the modes in turn, ``--repeats`` rounds (so that a change of the machine's load
  hits every mode alike), ``--steps`` optimizer steps each, the first one dropped (warm-up); the ratios of the
  median step times are the result, not the seconds (the machine is shared).
- Memory: each mode in a fresh process (tcmalloc keeps freed pages, so one process would carry the largest
  mode's pages into the next), as ``bench/plan/measure.py`` measures: VmHWM minus the resident set before the
  model was loaded, the high-water mark reset once the model is in memory, read when the third forward
  starts (two steps, with their backward, have run), at the bench's rows per step.
- ``--speed-rows``: packed rows per step of the speed runs (default 1, a third of the bench's: the machine is
  shared, and the ratios depend little on the batch).
Writes ``result.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "bench" / "plan"))
MODES = {"off": False, "selective": "selective", "full": True}
STOP_AT_FORWARD = 3  # two optimizer steps (AdamW's moments exist) have run when the third forward starts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode and round (first dropped)")
    parser.add_argument("--speed-rows", type=int, default=1, help="packed rows per step of the speed runs")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "checkpointing"))
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        mode, result = args.memory_child
        Path(result).write_text(json.dumps(memory_of(mode)), encoding="utf-8")
        return 0
    result = run(args.repeats, args.steps, args.speed_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


def bench_trainer(mode: str, work: Path, max_steps: int, rows: int | None = None):
    """(trainer, config) of the bench's aift run with this checkpointing mode, on a freshly loaded model."""
    from aift.bench.core import BenchOptions, bench_levers
    from aift.bench.data import synthetic_rows
    from aift.bench.measure import bench_precision
    from aift.bench.worker import LORA, aift_config, load_split
    from aift.config import LoRAConfig
    from aift.inference.japanese import JapaneseModel
    from aift.models.loading import resolve_model_path
    from aift.training.trainers import LoRAFinetuningTrainer

    bench = BenchOptions()
    data = work / "data.json"
    if not data.exists():
        data.write_text(json.dumps({"train": synthetic_rows(seed=bench.seed)[: bench.examples], "eval": []}))
    spec = {
        "model": resolve_model_path(bench.model), "data": str(data), "seq_len": bench.seq_len,
        "batch_size": bench.batch_size, "learning_rate": bench.learning_rate, "seed": bench.seed,
        "gradient_checkpointing": MODES[mode], "levers": bench_levers("lora", bench_precision()),
    }  # fmt: skip
    holder = JapaneseModel(spec["model"], device="cpu")
    _, train_ids, _ = load_split(spec, holder.load_tokenizer())
    run_dir = Path(tempfile.mkdtemp(prefix=f"aift-ckpt-{mode}-", dir=work))
    config = dataclasses.replace(aift_config(spec, train_ids, run_dir), max_steps=max_steps)
    if rows is not None:
        config = dataclasses.replace(config, batch_size=rows)
    dataset = [{"input_ids": ids, "labels": ids} for ids in train_ids]
    return holder, LoRAFinetuningTrainer(holder, LoRAConfig(**LORA), config, train_dataset=dataset), config


def step_seconds(mode: str, work: Path, steps: int, rows: int) -> list[float]:
    """Wall seconds of each optimizer step after the first, from the run's metrics.jsonl."""
    _, trainer, config = bench_trainer(mode, work, steps, rows)
    trainer.train()
    records = [json.loads(x) for x in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines() if x]
    times = [r["time"] for r in records if r.get("type") == "train"]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def memory_of(mode: str) -> dict:
    """This process's training peak for one mode (run in a fresh child: see the module's docstring)."""
    import torch
    from measure import Measured, proc_status_bytes, reset_peak

    from aift.training.loop import run_training
    from aift.training.objectives.sft import SFTObjective

    class Probe(SFTObjective):
        calls = 0

        def loss_sum(self, model, batch, autocast):
            self.calls += 1
            if self.calls == STOP_AT_FORWARD:
                raise Measured({"hwm": proc_status_bytes("VmHWM"), "rss": proc_status_bytes("VmRSS")})
            return super().loss_sum(model, batch, autocast)

    baseline = proc_status_bytes("VmRSS")
    with tempfile.TemporaryDirectory(prefix="aift-ckpt-mem-") as tmp:
        holder, trainer, config = bench_trainer(mode, Path(tmp), STOP_AT_FORWARD + 1)
        holder.load_model()
        reset = reset_peak()
        model, tokenizer, train_examples, _, info = trainer.prepare()
        try:
            run_training(model, tokenizer, trainer.config, train_examples, None, info,
                         objective=Probe(loss_chunk_size=config.loss_chunk_size))  # fmt: skip
        except Measured as done:
            figures = done.args[0]
        else:
            raise RuntimeError("the run ended before the probe's forward")
    return {
        "mode": mode,
        "peak_gb": (figures["hwm"] - baseline) / 1e9,
        "peak_reset_after_load": reset,
        "rows_per_step": config.batch_size,
        "threads": torch.get_num_threads(),
        "selective_layers": trainer.selective_layers,
    }


def memory_in_child(mode: str, work: Path) -> dict:
    from measure import child_env

    result = work / f"memory-{mode}.json"
    env = {**child_env(), "OMP_NUM_THREADS": "2"}
    with open(work / f"memory-{mode}.log", "w", encoding="utf-8") as log:
        subprocess.run([sys.executable, __file__, "--memory-child", mode, str(result)], env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True, cwd=REPO)  # fmt: skip
    return json.loads(result.read_text(encoding="utf-8"))


def run(repeats: int, steps: int, speed_rows: int) -> dict:
    import torch

    from aift.bench.core import load_average
    from aift.utils.allocator import tcmalloc_mapped

    load_before = load_average()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="aift-ckpt-") as tmp:
        work = Path(tmp)
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        step_seconds("off", work, 2, speed_rows)  # warm-up: the process's first steps are slower
        for _ in range(repeats):
            for mode in MODES:
                seconds[mode] += step_seconds(mode, work, steps, speed_rows)
        load_middle = load_average()
        memory = {mode: memory_in_child(mode, work) for mode in MODES}
    median = {mode: statistics.median(s) for mode, s in seconds.items()}
    return {
        "step_seconds": seconds,
        "median_step_s": median,
        "step_time_vs_off": {mode: median[mode] / median["off"] for mode in MODES},
        "peak_memory_gb": {mode: memory[mode]["peak_gb"] for mode in MODES},
        "memory_runs": memory,
        "rows_per_step": memory["off"]["rows_per_step"],
        "speed_rows_per_step": speed_rows,
        "allocator": "tcmalloc" if tcmalloc_mapped() else "system",
        "load_average": {"before": load_before, "after_speed": load_middle, "after": load_average()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }


def markdown(r: dict) -> str:
    lines = [
        "# Gradient checkpointing off, selective and full (the bench's aift run)",
        "",
        f"LoRA r=16 all-linear on SmolLM2-135M-Instruct, fp32, packed rows of 512 tokens: {r['rows_per_step']} a "
        f"step for the memory (the bench's), {r['speed_rows_per_step']} for the speed; {r['allocator']}, 2 threads; "
        f"{r['date']}. Load average before {r['load_average']['before']}, "
        f"after the speed runs {r['load_average']['after_speed']}, after {r['load_average']['after']} "
        "(shared machine: compare the ratios, measured in one process with the modes in turn).",
        "",
        "| checkpointing | median step s | step time vs off | peak memory GB | steps timed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        lines.append(
            f"| {mode} | {r['median_step_s'][mode]:.2f} | {r['step_time_vs_off'][mode]:.2f}x | "
            f"{r['peak_memory_gb'][mode]:.2f} | {len(r['step_seconds'][mode])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
