"""`aift plan`'s memory model against the peak memory measured on this CPU, for the embedded model.

    python bench/plan/run.py                 # measures the grid (about 10 min on 2 shared cores), then reports
    python bench/plan/run.py --report-only   # predictions again for the stored measurements (after a model change)

Each configuration trains in its own process (bench/plan/measure.py: the real loop, two optimizer steps of
two micro-batches, peak resident set above the process's baseline before the model was loaded), on tcmalloc
as `aift train` runs. The prediction is ``plan_training(...)`` for one device with the same method, batch,
length, checkpointing and dtype, without the CUDA context (there is none on a CPU). Writes
bench/results/plan/: result.json, results.md, chart.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = REPO / "bench" / "results" / "plan"
MODEL = "smollm2-135m-instruct"
TOLERANCE = 0.15
# (batch, length): 128 and 512 tokens a micro-batch; kept small because each configuration
# runs four micro-batches on one thread.
SHAPES = ((1, 128), (2, 256))
METHODS = ("full", "lora")
DTYPE = "fp32"


def grid() -> list[dict]:
    return [
        {"model": MODEL, "method": m, "batch_size": b, "max_length": t, "gradient_checkpointing": ckpt, "dtype": DTYPE}
        for m in METHODS
        for ckpt in (True, False)
        for b, t in SHAPES
    ]


def measure(spec: dict, workdir: Path) -> dict:
    from measure import measure_in_child  # bench/plan/measure.py, beside this script

    result = measure_in_child(spec, workdir)
    name = "{method} {batch_size}x{max_length} ckpt={gradient_checkpointing}".format(**spec)
    print(f"{name}: {result['measured_gb']:.3f} GB in {result['train_seconds']:.0f} s", flush=True)
    return result


def predict(row: dict) -> dict:
    """What `aift plan` says for one device running this configuration, GB (1e9 bytes) like the measurement."""
    from aift.distributed.planning import plan_training

    plan = plan_training(
        row["model"],
        gpus=1,
        gpu_memory_gb=1000,
        method=row["method"],
        batch_size=row["batch_size"],
        max_length=row["max_length"],
        gradient_checkpointing=row["gradient_checkpointing"],
        dtype=row["dtype"],
    )
    est = plan.devices[0].estimate
    return {
        "predicted_gb": est.total / 1e9,
        "predicted_parts_gb": {
            "weights": est.weights / 1e9,
            "gradients": est.gradients / 1e9,
            "optimizer": est.optimizer / 1e9,
            "activations": est.activations / 1e9,
        },
    }


def with_predictions(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        row = {**row, **predict(row)}
        row["error"] = row["predicted_gb"] / row["measured_gb"] - 1
        row["within_tolerance"] = abs(row["error"]) <= TOLERANCE
        out.append(row)
    return out


def environment(load_before: list[float], load_after: list[float] | None) -> dict:
    import torch
    import transformers

    from aift.bench.core import load_average

    return {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_before": load_before,
        "load_after": load_after or load_average(),
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# aift plan vs measured peak memory: {MODEL} on a CPU",
        "",
        f"Each row: the real training loop, {result['dtype']} weights and compute, two optimizer steps of two "
        "micro-batches (batch x length tokens each), AdamW, LoRA r=16 all-linear (dropout 0.05), one process per "
        "row on tcmalloc and one thread. Measured = peak resident set minus the process's resident set before "
        "the model was loaded (GB = 1e9 bytes). Predicted = `plan_training(...)` for one device, without the "
        f"CUDA context. Tolerance {TOLERANCE:.0%}.",
        f"Machine: {env['machine']}, {env['cores']} cores, torch {env['torch']}, transformers "
        f"{env['transformers']}; load average {env['load_before']} before, {env['load_after']} after "
        "(memory does not depend on the load; only the run time does).",
        "",
        "| method | batch x length | checkpointing | measured GB | predicted GB | error | weights | grads | optim "
        "| activations |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        parts = r["predicted_parts_gb"]
        lines.append(
            f"| {r['method']} | {r['batch_size']} x {r['max_length']} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['measured_gb']:.3f} | {r['predicted_gb']:.3f} | {r['error']:+.1%} | {parts['weights']:.3f} "
            f"| {parts['gradients']:.3f} | {parts['optimizer']:.3f} | {parts['activations']:.3f} |"
        )
    met = sum(r["within_tolerance"] for r in result["rows"])
    lines += [
        "",
        f"Within {TOLERANCE:.0%}: {met} of {len(result['rows'])} rows; largest error {result['max_abs_error']:.1%}.",
    ]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [
        f"{r['method']}\n{r['batch_size']}x{r['max_length']}\n{'ckpt' if r['gradient_checkpointing'] else 'no ckpt'}"
        for r in rows
    ]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["measured_gb"] for r in rows], width=0.4, label="measured (peak RSS - baseline)")
    ax.bar([i + 0.2 for i in x], [r["predicted_gb"] for r in rows], width=0.4, label="aift plan")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("GB")
    ax.set_title(f"{MODEL}: predicted vs measured peak training memory ({rows[0]['dtype']}, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], load_before: list[float], load_after: list[float] | None = None) -> None:
    """result.json, results.md and chart.png; the load after the measurements is read now unless given."""
    rows = with_predictions(rows)
    result = {
        "model": MODEL,
        "dtype": DTYPE,
        "tolerance": TOLERANCE,
        "max_abs_error": max(abs(r["error"]) for r in rows),
        "all_within_tolerance": all(r["within_tolerance"] for r in rows),
        "environment": environment(load_before, load_after),
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (OUT / "results.md").write_text(markdown(result), encoding="utf-8")
    chart(rows, OUT / "chart.png")
    print(markdown(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="Reuse result.json's measurements.")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from aift.bench.core import load_average

    if args.report_only:
        old = json.loads((OUT / "result.json").read_text(encoding="utf-8"))
        keep = ("predicted_gb", "predicted_parts_gb", "error", "within_tolerance")
        env = old["environment"]
        write(
            [{k: v for k, v in r.items() if k not in keep} for r in old["rows"]], env["load_before"], env["load_after"]
        )
        return 0
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="aift-plan-bench-") as tmp:
        rows = [measure(spec, Path(tmp)) for spec in grid()]
    OUT.mkdir(parents=True, exist_ok=True)  # the measurements first: --report-only can start from them
    raw = {"environment": {"load_before": load_before}, "rows": rows}
    (OUT / "result.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    write(rows, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
