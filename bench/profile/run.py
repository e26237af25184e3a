"""Where a training step of `make bench`'s aift run spends its time: torch.profiler over steady-state steps.

    python bench/profile/run.py [--gradient-checkpointing off] [--steps 3] [--out bench/results/profile]

Trains the bench's configuration (the embedded model, LoRA r=16 all-linear, the synthetic instruction set,
packing with segment attention, fused LoRA layers, the fused chunked cross-entropy, tcmalloc when preloaded,
the bench's precision: bf16 only where the CPU has it in hardware) and profiles the CPU ops of ``--steps``
optimizer steps after two warm-up steps. A step is one forward of the batch (one micro-batch per step), so
the profiler's step boundary is the embedding's forward. Writes ``result.json`` (per-step milliseconds by
category and the wall time the loop measured for the same steps), ``results.md``, ``ops.txt`` (the op table)
and ``chart.png``.

Categories, by op name: matmul (mm/addmm/bmm/linear: the model's GEMMs, forward and backward), attention
(segment attention or SDPA and their backward), loss (the chunked cross-entropy's own ops besides its GEMMs:
log-softmax, gather), optimizer (AdamW), norm+activation (RMSNorm, SiLU, their backward), and the rest
(copies, adds, reshapes). "Not in an op" is wall time minus the profiled op time: Python, the data path and
the autograd engine between ops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# op name fragments -> category, first match wins (self CPU time is counted once, in the op that spent it)
CATEGORIES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_", "aten::linear")),
    ("attention", ("segment", "attention", "aten::_scaled_dot_product", "flash", "aten::_softmax")),
    ("loss", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "aten::gather", "aten::scatter")),
    ("optimizer", ("adam", "aten::_foreach", "optimizer")),
    ("norm + activation", ("rsqrt", "aten::pow", "aten::mean", "silu", "aten::sigmoid", "rms_norm", "aten::tanh")),
]


NOT_IN_AN_OP = "not in an op (Python, data, autograd engine)"


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(f.lower() in lowered for f in fragments):
            return label
    return "other ops"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after 2 warm-up steps")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "profile"))
    args = parser.parse_args(argv)
    result = profile(args.gradient_checkpointing == "on", args.steps, Path(args.out))
    print(markdown(result))
    return 0


def profile(gradient_checkpointing: bool, steps: int, out: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, schedule

    from aift.bench.core import BenchOptions, bench_levers, load_average
    from aift.bench.data import synthetic_rows
    from aift.bench.measure import bench_precision
    from aift.bench.worker import LORA, aift_config, load_split, set_threads
    from aift.config import LoRAConfig
    from aift.inference.japanese import JapaneseModel
    from aift.models.loading import resolve_model_path
    from aift.training.trainers import LoRAFinetuningTrainer

    load_before = load_average()
    threads = set_threads(1)
    precision = bench_precision()
    work = Path(tempfile.mkdtemp(prefix="aift-profile-"))
    data = work / "data.json"
    bench = BenchOptions()  # the bench's defaults: the same data, sequence, batch and learning rate
    rows = synthetic_rows(seed=bench.seed)
    data.write_text(json.dumps({"train": rows[: bench.examples], "eval": []}), encoding="utf-8")
    model_dir = resolve_model_path(bench.model)
    spec = {
        "model": model_dir, "data": str(data), "seq_len": bench.seq_len, "batch_size": bench.batch_size,
        "learning_rate": bench.learning_rate, "seed": bench.seed, "gradient_checkpointing": gradient_checkpointing,
        "levers": bench_levers("lora", precision),
    }  # fmt: skip
    holder = JapaneseModel(model_dir, device="cpu")
    _, train_ids, _ = load_split(spec, holder.load_tokenizer())
    # Profiler step 0 is the setup (wait), 1-2 the warm-up training steps; it closes at the step after the last.
    warmup, total_steps = 2, 2 + steps + 1
    config = dataclasses.replace(aift_config(spec, train_ids, work / "run"), max_steps=total_steps)
    dataset = [{"input_ids": ids, "labels": ids} for ids in train_ids]
    trainer = LoRAFinetuningTrainer(holder, LoRAConfig(**LORA), config, train_dataset=dataset)
    embedding = holder.load_model().get_input_embeddings()
    with torch.profiler.profile(
        activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=warmup, active=steps, repeat=1)
    ) as prof:
        # One forward per optimizer step (one micro-batch, no recompute forward when checkpointing is off; with
        # it on, the recomputed forward goes through the layers, not the embedding).
        hook = embedding.register_forward_pre_hook(lambda module, args: prof.step())
        try:
            trainer.train()
        finally:
            hook.remove()
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in records if r.get("type") == "train"]
    before, last = train[warmup - 1], train[warmup + steps - 1]  # records hold running totals and times
    wall_ms = 1000 * (last["time"] - before["time"]) / steps
    tokens = (last["tokens"] - before["tokens"]) / steps
    by_category: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1000 / steps
        if self_ms <= 0:
            continue
        # The profiler's own step record: its self time is what ran between ops (Python, data, autograd engine).
        label = NOT_IN_AN_OP if event.key.startswith("ProfilerStep") else category(event.key)
        by_category[label] = by_category.get(label, 0.0) + self_ms
        ops.append((self_ms, event.count / steps, event.key, label))
    unprofiled = max(0.0, wall_ms - sum(by_category.values()))  # before the first op or after the last of a step
    by_category[NOT_IN_AN_OP] = by_category.get(NOT_IN_AN_OP, 0.0) + unprofiled
    result = {
        "gradient_checkpointing": gradient_checkpointing,
        "precision": precision,
        "threads": threads,
        "allocator": "tcmalloc" if "libtcmalloc" in os.environ.get("LD_PRELOAD", "") else "system",
        "profiled_steps": steps,
        "warmup_steps": warmup,
        "rows_per_step": config.batch_size,
        "tokens_per_step": tokens,
        "step_wall_ms": wall_ms,
        "tokens_per_s": tokens / (wall_ms / 1000),
        "ms_per_step_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_ops": [
            {"op": k, "ms_per_step": ms, "calls_per_step": n, "category": c}
            for ms, n, k, c in sorted(ops, reverse=True)[:25]
        ],  # fmt: skip
        "load_average": {"before": load_before, "after": load_average()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }
    write(result, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60), out)
    return result


def markdown(result: dict) -> str:
    wall = result["step_wall_ms"]
    lines = [
        "# Where a step of the bench's aift run goes",
        "",
        f"LoRA r=16 all-linear on SmolLM2-135M-Instruct, {result['rows_per_step']} packed rows of 512 tokens "
        f"(~{result['tokens_per_step']:.0f} tokens) per step, {result['precision']}, gradient checkpointing "
        f"{'on' if result['gradient_checkpointing'] else 'off'}, {result['threads']} threads, "
        f"{result['allocator']} allocator; mean of {result['profiled_steps']} steps after "
        f"{result['warmup_steps']} warm-up steps: {wall:.0f} ms a step, {result['tokens_per_s']:.0f} tokens/s. "
        f"Load average before {result['load_average']['before']}, after {result['load_average']['after']}.",
        "",
        "| where | ms per step | share |",
        "| --- | ---: | ---: |",
    ]
    for name, ms in result["ms_per_step_by_category"].items():
        lines.append(f"| {name} | {ms:.0f} | {ms / wall:.0%} |")
    lines += ["", "Largest ops (self CPU time):", "", "| op | category | ms per step | calls per step |",
              "| --- | --- | ---: | ---: |"]  # fmt: skip
    for op in result["top_ops"][:15]:
        lines.append(f"| `{op['op']}` | {op['category']} | {op['ms_per_step']:.1f} | {op['calls_per_step']:.0f} |")
    return "\n".join(lines) + "\n"


def write(result: dict, table: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("result.json", json.dumps(result, indent=2)), ("results.md", markdown(result)),
                       ("ops.txt", table)):  # fmt: skip
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    chart(result, out / "chart.png")


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(result["ms_per_step_by_category"].items())[::-1]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_xlabel("ms per step")
    ax.set_title(f"aift LoRA step: {result['step_wall_ms']:.0f} ms ({result['precision']}, checkpointing "
                 f"{'on' if result['gradient_checkpointing'] else 'off'})")  # fmt: skip
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
