"""The benchmark's outputs: result.json, results.md (tables), chart.png (scaling.png with several process
counts), and the one-line summary."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from aift.bench.settings import settings_markdown
from aift.models.run_folder import BENCH_RESULT_FILE
from aift.utils.files import write_bytes_atomic, write_json_atomic, write_text_atomic

# name -> (how the figure is read, the target, whether higher is better); issue #17's targets
TARGETS = {
    "speedup": ("aift tokens/s over TRL tokens/s", 8.0, True),
    "mfu": ("aift model FLOPs utilisation of the matmul peak in the runs' precision", 0.50, True),
    "memory_ratio": ("aift peak memory over TRL peak memory", 0.5, False),
    "eval_loss_gap": ("abs(aift eval loss / TRL eval loss - 1)", 0.03, False),
}


def target_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its value and whether it is met (targets without a value are left out)."""
    rows = []
    for key, (meaning, target, higher) in TARGETS.items():
        value = result.get(key)
        if value is None:
            continue
        met = value >= target if higher else value <= target
        rows.append({"name": key, "meaning": meaning, "target": target, "value": value, "met": met})
    return rows


def summary_line(result: dict[str, Any]) -> str:
    """The last line the benchmark prints."""
    a = result["aift"]
    procs = f" ({a['nproc']} processes)" if a.get("nproc", 1) > 1 else ""
    parts = [f"aift{procs} {a['tokens_per_s']:.0f} tok/s, {a['peak_mem_gb']:.2f} GB, eval loss {a['eval_loss']:.4f}"]
    if result.get("trl"):
        t = result["trl"]
        parts.append(f"TRL {t['tokens_per_s']:.0f} tok/s, {t['peak_mem_gb']:.2f} GB, eval loss {t['eval_loss']:.4f}")
        parts.append(f"speedup {result['speedup']:.2f}x, memory ratio {result['memory_ratio']:.2f}")
    parts.append(f"MFU {result['mfu']:.2f}")
    for row in (result.get("optimizers") or [])[1:]:
        parts.append(f"{row['optimizer']} {row['tokens_per_s']:.0f} tok/s, {row['peak_mem_gb']:.2f} GB")
    for row in result.get("scaling") or []:
        if row["nproc"] != row["speedup_vs_nproc"]:
            parts.append(f"{row['nproc']} processes {row['tokens_per_s']:.0f} tok/s ({row['speedup']:.2f}x)")
    return "bench: " + "; ".join(parts)


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _checkpointing(value: bool | str) -> str:
    if value == "selective":
        return "selective for aift (full for TRL)"
    return "on" if value else "off"


def markdown(result: dict[str, Any]) -> str:
    s, env = result["settings"], result["environment"]
    lines = [
        f"# aift bench: {s['method']} on {s['model_name']}",
        "",
        f"{s['examples']} training examples (one epoch), {s['eval_examples']} held-out, sequence {s['seq_len']}, "
        f"batch {s['batch_size']}, learning rate {s['learning_rate']}, gradient checkpointing "
        f"{_checkpointing(s['gradient_checkpointing'])} and {_precision(result)} for every run; data: {s['data']}.",
        f"Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, trl {env.get('trl', '-')}; load average {env['load_before']} before, "
        f"{env['load_after']} after.",
        "",
        "| run | tokens/s | peak memory GB | eval loss | train time s | steps | allocator |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, run in _runs(result):
        lines.append(
            f"| {name} | {run['tokens_per_s']:.0f} | {run['peak_mem_gb']:.2f} | {run['eval_loss']:.4f} | "
            f"{run['train_time_s']:.1f} | {run['steps']} | {run['allocator']} |"
        )
    lines += ["", "| target | meaning | value | target | met |", "| --- | --- | ---: | ---: | --- |"]
    for row in target_rows(result):
        op = ">=" if TARGETS[row["name"]][2] else "<="
        lines.append(
            f"| {row['name']} | {row['meaning']} | {row['value']:.3f} | {op} {row['target']} | {_fmt(row['met'])} |"
        )
    peak = result["matmul_peak_gflops"]
    sizes = result.get("matmul_peak_sizes") or {"bf16": 2048, "fp32": 2048}
    lines += [
        "",
        "Matmul peak (torch.matmul of square matrices): "
        + ", ".join(f"{peak[p]:.0f} GFLOP/s {p} ({n}x{n})" for p, n in sizes.items())
        + ".",
        f"MFU = model FLOPs / train time / {result.get('precision', 'bf16')} peak; "
        f"model FLOPs = {result['flops_formula']}.",
    ]
    if result.get("trl") and result["trl"].get("settings") and result["aift"].get("settings"):
        lines += ["", "## Settings of the two runs", ""]
        lines += settings_markdown("aift", result["aift"]["settings"], "TRL", result["trl"]["settings"])
    if result["aift"].get("compile_time_s"):
        lines.append(f"torch.compile took {result['aift']['compile_time_s']:.1f} s, not counted in tokens/s.")
    if result.get("ablation"):
        lines += ["", "## Ablation: each lever switched off alone", "", *ablation_markdown(result)]
    if _has_scaling(result):
        lines += ["", "## Scaling over processes", "", *scaling_markdown(result)]
    if len(result.get("optimizers") or []) > 1:
        lines += ["", "## Optimizers", "", *optimizers_markdown(result)]
    return "\n".join(lines) + "\n"


def _precision(result: dict[str, Any]) -> str:
    """How the runs computed, and why (a CPU without bf16 instructions trains both in fp32)."""
    precision = result.get("precision", "bf16")
    if precision == "bf16":
        return "bf16 autocast"
    if result["settings"].get("precision", "auto") == "auto":
        return "fp32 (this device has no bf16 in hardware: emulated bf16 is far slower than fp32)"
    return "fp32"


def _has_scaling(result: dict[str, Any]) -> bool:
    rows = result.get("scaling") or []
    return len(rows) > 1 or any(row["nproc"] > 1 for row in rows)


def scaling_markdown(result: dict[str, Any]) -> list[str]:
    """The scaling table: tokens/s summed over ranks, speedup and efficiency, memory per rank."""
    rows = result["scaling"]
    base = rows[0]["speedup_vs_nproc"]
    env = result["environment"]
    device = f"{env['gpu']} GPUs" if env.get("gpu") else f"{env['cores']} CPU cores shared by the processes"
    lines = [
        f"tokens/s = real (non-padding) tokens of all ranks / train time of the slowest rank; {device}. "
        "Efficiency = speedup / (processes / base processes).",
        "",
        f"| processes | tokens | tokens/s | speedup vs {base} | efficiency | train time s | steps | "
        "peak memory GB (max rank) | peak memory GB (sum) | eval loss |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['nproc']} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | "
            f"{r['train_time_s']:.1f} | {r['steps']} | {r['peak_mem_gb_max']:.2f} | {r['peak_mem_gb_sum']:.2f} | "
            f"{_fmt(r['eval_loss'], 4)} |"
        )
    if not env.get("gpu"):
        lines += [
            "",
            "On a CPU the processes share the same cores that one process uses with all its threads, so more "
            "processes cannot add compute: the ratio measures DDP's cost (gradient all-reduce over gloo, more "
            "Python processes) against what single-threaded processes gain, not a multi-GPU speed-up.",
        ]
    return lines


def scaling_chart(result: dict[str, Any], path: Path) -> None:
    """One bar per process count: tokens/s, labelled with the speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["scaling"]
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(rows) + 2), 3.8))
    bars = ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color="#2a7ab0")
    ax.set_xticks(range(len(rows)), [str(r["nproc"]) for r in rows])
    ax.bar_label(bars, labels=[f"{r['tokens_per_s']:.0f} ({r['speedup']:.2f}x)" for r in rows], fontsize=8)
    ax.set_xlabel("processes")
    ax.set_ylabel("tokens/s (all ranks)")
    s = result["settings"]
    ax.set_title(f"aift {s['method']} on {Path(str(s['model_name'])).name}, seq {s['seq_len']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def optimizers_markdown(result: dict[str, Any]) -> list[str]:
    """Speed and memory per optimizer (aift's run, same data, same settings otherwise)."""
    rows = result["optimizers"]
    first = rows[0]["optimizer"]
    lines = [
        "Optimizer state: the size of optimizer.pt in the run's last checkpoint (what the optimizer holds beside the "
        "model).",
        "",
        f"| optimizer | tokens/s | vs {first} | peak memory GB | vs {first} | optimizer state MB | final train loss | "
        "eval loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['tokens_per_s']:.0f} | {r['speed_vs_first']:.2f}x | {r['peak_mem_gb']:.2f} | "
            f"{_fmt(r['memory_vs_first'])}x | {_fmt(r['optimizer_state_mb'], 1)} | {_fmt(r['final_train_loss'], 4)} | "
            f"{_fmt(r['eval_loss'], 4)} |"
        )
    return lines


def ablation_markdown(result: dict[str, Any]) -> list[str]:
    base = result["aift"]
    lines = [
        "| run | tokens/s | vs all levers | peak memory GB | eval loss |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| all levers | {base['tokens_per_s']:.0f} | 1.00x | {base['peak_mem_gb']:.2f} | {base['eval_loss']:.4f} |",
    ]
    for row in result["ablation"]:
        ratio = row["tokens_per_s"] / base["tokens_per_s"]
        lines.append(
            f"| {row['name']} | {row['tokens_per_s']:.0f} | {ratio:.2f}x | {row['peak_mem_gb']:.2f} | "
            f"{row['eval_loss']:.4f} |"
        )
    return lines


def _runs(result: dict[str, Any]) -> list[tuple[str, dict]]:
    runs = [("aift (all levers)", result["aift"])]
    if result.get("trl"):
        runs.append(("TRL SFTTrainer", result["trl"]))
    runs += [(f"aift {row['name']}", row) for row in result.get("ablation") or []]
    return runs


def chart(result: dict[str, Any], path: Path) -> None:
    """Three bar panels (tokens/s, peak memory, eval loss), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(result)
    names = [name.replace("aift ", "aift\n", 1) if name != "aift (all levers)" else "aift" for name, _ in runs]
    colors = ["#2a7ab0" if name.startswith("aift") else "#d9822b" for name, _ in runs]
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 1.6 * len(runs) * 3 / 2), 4.2))
    panels = [("tokens_per_s", "tokens/s (higher is better)"), ("peak_mem_gb", "peak memory GB (lower is better)"),
              ("eval_loss", "held-out loss (lower is better)")]  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [run[key] for _, run in runs]
        bars = ax.bar(range(len(runs)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.0f}" if key == "tokens_per_s" else f"{v:.2f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(runs)), names, fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=9)
    s = result["settings"]
    fig.suptitle(f"{s['method']} on {s['model_name']}, seq {s['seq_len']}, {s['examples']} examples", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())


def write_all(result: dict[str, Any], output_dir: Path) -> None:
    """result.json, results.md and chart.png in output_dir, each written whole or not at all."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / BENCH_RESULT_FILE, result, ensure_ascii=True)
    write_text_atomic(output_dir / "results.md", markdown(result))
    chart(result, output_dir / "chart.png")
    if _has_scaling(result):
        scaling_chart(result, output_dir / "scaling.png")
