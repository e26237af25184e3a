"""One self-contained HTML page (plus the PNGs beside it) comparing training runs.

    from aift.eval.report import build_report
    html_path = build_report(["results/"], "report/")

Reads, from each run dir (docs/CONTRACTS.md): `metrics.jsonl`, `train_summary.json`, `final/aift_meta.json`,
`eval.json` (written by `aift eval --output`), `result.json` (written by `aift bench`) and
`system_metrics.jsonl` (written by the metrics sampler). A run that crashed (no summary, a truncated last
line) is drawn with what it has and marked incomplete; unreadable pieces are listed, never fatal.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aift.errors import AiftError
from aift.eval.report_samples import completions_html, samples_html
from aift.models.run_folder import (
    BENCH_RESULT_FILE,
    COMPLETIONS_FILE,
    EVAL_FILE,
    FINAL_DIR,
    META_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    SYSTEM_METRICS_FILE,
)
from aift.utils.files import FileFormatError, read_json_object, read_jsonl, write_bytes_atomic

RUN_FILES = (METRICS_FILE, SUMMARY_FILE, EVAL_FILE, BENCH_RESULT_FILE, SYSTEM_METRICS_FILE)
SEARCH_DEPTH = 3  # how deep below a given folder runs are looked for (results/<group>/<run>/)


class ReportError(AiftError, ValueError):
    """Nothing to report on: a path does not exist or holds no run."""


@dataclass
class Run:
    """Everything read from one run dir; `problems` says what could not be read."""

    path: Path
    name: str
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    summary: dict | None = None
    meta: dict | None = None
    eval_result: dict | None = None
    bench: dict | None = None
    system: list[dict] = field(default_factory=list)
    completions: list[dict] = field(default_factory=list)  # GRPO's sampled completions, every few steps
    problems: list[str] = field(default_factory=list)
    has_metrics_file: bool = False

    @property
    def is_training(self) -> bool:
        return bool(self.has_metrics_file or self.train or self.evals or self.summary)

    @property
    def incomplete(self) -> bool:
        """A training run without a completed summary (crashed, killed or still running)."""
        return self.is_training and not (self.summary or {}).get("completed", False)

    @property
    def label(self) -> str:
        return f"{self.name} (incomplete)" if self.incomplete else self.name


# ---------------------------------------------------------------- reading


def _read_json(path: Path, run: Run) -> dict | None:
    if not path.is_file():
        return None
    try:
        return read_json_object(path)
    except (OSError, FileFormatError) as e:
        run.problems.append(f"{path.name} unreadable ({e})")
        return None


def _read_jsonl(path: Path, run: Run) -> list[dict]:
    """The JSON objects of a .jsonl file; bad lines are skipped and noted (a crash truncates the last one)."""
    if not path.is_file():
        return []
    try:
        return read_jsonl(path, on_bad_line=lambda problem: run.problems.append(f"{path.name}: {problem}, skipped"))
    except OSError as e:
        run.problems.append(f"{path.name} unreadable ({e})")
        return []


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Reads one run dir; never raises for missing or damaged files (they go to `problems`)."""
    path = Path(path)
    run = Run(path=path, name=name or path.name, has_metrics_file=(path / METRICS_FILE).is_file())
    for record in _read_jsonl(path / METRICS_FILE, run):
        kind = record.get("type")
        if kind == "train" or (kind is None and "loss" in record):
            run.train.append(record)
        elif kind == "eval" or (kind is None and "eval_loss" in record):
            run.evals.append(record)
    run.summary = _read_json(path / SUMMARY_FILE, run)
    run.meta = _read_json(path / FINAL_DIR / META_FILE, run)
    run.eval_result = _read_json(path / EVAL_FILE, run)
    run.bench = _read_json(path / BENCH_RESULT_FILE, run)
    run.system = [s for s in _read_jsonl(path / SYSTEM_METRICS_FILE, run) if "timestamp" in s or "time" in s]
    run.completions = _read_jsonl(path / COMPLETIONS_FILE, run)
    if run.is_training and run.summary is None:
        run.problems.append("no train_summary.json (the run did not finish)")
    elif run.summary is not None and not run.summary.get("completed", False):
        run.problems.append("train_summary.json says the run did not complete")
    return run


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in RUN_FILES)


def find_run_dirs(path: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """`path` itself when it is a run, else the runs below it (sorted), down to `depth` levels."""
    if is_run_dir(path):
        return [path]
    if depth == 0 or not path.is_dir():
        return []
    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [run for child in children for run in find_run_dirs(child, depth - 1)]


def discover_runs(paths: list[str | Path]) -> list[Run]:
    """The runs in the given folders (each a run dir or a parent of run dirs), named uniquely."""
    found: list[tuple[Path, Path]] = []
    for given in map(Path, paths):
        if not given.exists():
            raise ReportError(f"{given} does not exist")
        runs = find_run_dirs(given)
        if not runs:
            raise ReportError(f"no run found in {given} (a run dir holds one of: {', '.join(RUN_FILES)})")
        found += [(given, run) for run in runs if run not in (r for _, r in found)]
    names = [_run_name(given, run) for given, run in found]
    return [load_run(run, name) for (_, run), name in zip(found, names, strict=True)]


def _run_name(given: Path, run: Path) -> str:
    if run == given:
        return run.resolve().name or str(run)
    return run.relative_to(given).as_posix()


# ---------------------------------------------------------------- figures for the table


def _last(records: list[dict], key: str) -> Any:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def _tokens(run: Run) -> float | None:
    """Tokens trained: the summary's figure, else from the train lines (cumulative when they only grow)."""
    if run.summary and run.summary.get("tokens") is not None:
        return run.summary["tokens"]
    values = [r["tokens"] for r in run.train if isinstance(r.get("tokens"), (int, float))]
    if not values:
        return None
    return values[-1] if values == sorted(values) else sum(values)


def run_row(run: Run) -> dict[str, Any]:
    """The figures of one run for the table of runs (summary first, metrics.jsonl as the fallback)."""
    summary, meta = run.summary or {}, run.meta or {}
    wall = summary.get("wall_time_s")
    if wall is None:
        wall = max((r["time"] for r in run.train + run.evals if isinstance(r.get("time"), (int, float))), default=None)
    tokens = _tokens(run)
    speed = summary.get("train_tokens_per_s")
    if speed is None and tokens and wall:
        speed = tokens / wall
    row = {
        "run": run.name,
        "status": "incomplete" if run.incomplete else ("complete" if run.is_training else "-"),
        "model": summary.get("model") or meta.get("base_model"),
        "method": summary.get("method") or meta.get("method"),
        "objective": summary.get("objective"),
        "steps": summary.get("steps") or _last(run.train, "step"),
        "tokens": tokens,
        "time_s": wall,
        "tokens_per_s": speed,
        "final_train_loss": summary.get("final_train_loss", _last(run.train, "loss")),
        "initial_eval_loss": summary.get("initial_eval_loss", (run.evals[0].get("eval_loss") if run.evals else None)),
        "final_eval_loss": summary.get("final_eval_loss", _last(run.evals, "eval_loss")),
        "peak_mem_gb": summary.get("peak_mem_gb", _last(run.train, "peak_mem_gb")),
        # Preference runs (DPO, ORPO, SimPO, KTO): the last logged reward accuracy and margin, train and eval.
        "reward_accuracy": _last(run.train, "rewards/accuracies"),
        "reward_margin": _last(run.train, "rewards/margins"),
        "eval_reward_accuracy": _last(run.evals, "eval_rewards/accuracies"),
        "reward": _last(run.train, "reward"),  # GRPO: the last logged mean reward
    }
    row.update(_eval_figures(run.eval_result))
    return row


def _eval_figures(result: dict | None) -> dict[str, Any]:
    if not result or not isinstance(result.get("metrics"), dict):
        return {}
    metrics, delta = result["metrics"], result.get("delta") or {}
    figures = {f"eval_{k}": metrics.get(k) for k in ("perplexity", "exact_match", "chrf", "rouge_l")}
    figures.update({f"delta_{k}": v for k, v in delta.items()})
    return figures


def bench_row(run: Run) -> dict[str, Any]:
    """The headline figures of a bench result.json (nested `{"aift": {...}}` or flat `"aift.tokens_per_s"`)."""

    def get(key: str) -> Any:
        if key in run.bench:
            return run.bench[key]
        side, _, name = key.partition(".")
        part = run.bench.get(side)
        return part.get(name) if isinstance(part, dict) else None

    keys = (
        "aift.tokens_per_s",
        "trl.tokens_per_s",
        "speedup",
        "aift.peak_mem_gb",
        "trl.peak_mem_gb",
        "memory_ratio",
        "mfu",
        "aift.eval_loss",
        "trl.eval_loss",
    )
    return {"run": run.name, **{key: get(key) for key in keys}}


# ---------------------------------------------------------------- charts


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pairs = [
        (r[x], r[key])
        for r in records
        if isinstance(r.get(x), (int, float)) and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _line_chart(runs: list[Run], key: str, title: str, ylabel: str, with_eval: bool = False) -> bytes | None:
    """One line per run of a train-line metric over steps; with `with_eval`, eval loss dashed beside it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    drawn = False
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        steps, values = _series(run.train, key)
        if steps:
            ax.plot(steps, values, color=color, label=f"{run.label} train" if with_eval else run.label)
            drawn = True
        if with_eval:
            steps, values = _series(run.evals, "eval_loss")
            if steps:
                ax.plot(steps, values, color=color, linestyle="--", marker="o", label=f"{run.label} eval")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _figure_png(fig)


def _system_chart(runs: list[Run]) -> bytes | None:
    """CPU %, memory and (when present) GPU use over time, one line per run that has system metrics."""
    import matplotlib.pyplot as plt

    sampled = [(i, run) for i, run in enumerate(runs) if run.system]
    if not sampled:
        return None
    has_gpu = any(s.get("gpu_util_percent") for _, run in sampled for s in run.system)
    panels = ["cpu", "memory"] + (["gpu_util", "gpu_mem"] if has_gpu else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True)
    for index, run in sampled:
        _plot_system(axes, panels, run, f"C{index % 10}")
    titles = {
        "cpu": "CPU utilisation (%)",
        "memory": "RSS (GB)",
        "gpu_util": "GPU utilisation (%)",
        "gpu_mem": "GPU memory (GB)",
    }
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_ylabel(titles[panel], fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].set_title("System metrics")
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("seconds since sampling began")
    return _figure_png(fig)


def _plot_system(axes, panels: list[str], run: Run, color: str) -> None:
    start = min(s.get("timestamp", s.get("time", 0.0)) for s in run.system)
    seconds = [s.get("timestamp", s.get("time", 0.0)) - start for s in run.system]

    def column(key: str, reduce=None) -> list[float]:
        values = [s.get(key) for s in run.system]
        if reduce is not None:
            values = [reduce(v) if v else math.nan for v in values]
        return [v if isinstance(v, (int, float)) else math.nan for v in values]

    memory_key = "rss_gb" if any("rss_gb" in s for s in run.system) else "mem_used_gb"
    data = {
        "cpu": column("cpu_percent"),
        "memory": column(memory_key),
        "gpu_util": column("gpu_util_percent", lambda v: sum(v) / len(v)),
        "gpu_mem": column("gpu_mem_gb", sum),
    }
    for ax, panel in zip(axes, panels, strict=True):
        ax.plot(seconds, data[panel], color=color, label=run.label)


def _bench_chart(runs: list[Run]) -> bytes | None:
    import matplotlib.pyplot as plt

    rows = [bench_row(run) for run in runs if run.bench]
    rows = [r for r in rows if isinstance(r["aift.tokens_per_s"], (int, float))]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    for i, row in enumerate(rows):
        ax.bar(i - width / 2, row["aift.tokens_per_s"], width, color="C0", label="aift" if i == 0 else None)
        if isinstance(row["trl.tokens_per_s"], (int, float)):
            ax.bar(i + width / 2, row["trl.tokens_per_s"], width, color="C1", label="TRL" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows])
    ax.set(title="Benchmark: training tokens/s", ylabel="tokens/s")
    ax.legend()
    return _figure_png(fig)


def make_charts(runs: list[Run]) -> dict[str, bytes]:
    """PNG bytes by file name, for the charts that have data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    # One colour per run, the same in every chart: index among the runs that have curves.
    charted = [run for run in runs if run.is_training or run.system]
    charts = {
        "loss.png": _line_chart(charted, "loss", "Loss (train solid, eval dashed)", "loss", with_eval=True),
        "learning_rate.png": _line_chart(charted, "lr", "Learning rate", "lr"),
        "tokens_per_s.png": _line_chart(charted, "tokens_per_s", "Training throughput", "tokens/s"),
        "memory.png": _line_chart(charted, "peak_mem_gb", "Peak memory", "GB"),
        "reward_margins.png": _line_chart(charted, "rewards/margins", "Preference reward margin", "chosen - rejected"),
        "reward.png": _line_chart(charted, "reward", "GRPO reward (all functions, weighted)", "mean reward"),
        "system_metrics.png": _system_chart(charted),
        "bench.png": _bench_chart(runs),
    }
    return {name: png for name, png in charts.items() if png is not None}


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI','Hiragino Sans','Yu Gothic','Noto Sans CJK JP',sans-serif;margin:24px;color:#222;max-width:1150px}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:12px 0;font-size:13px} th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f0f3f7;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.incomplete{color:#b00020;font-weight:600} .complete{color:#18794e}
.charts{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.charts img{max-width:100%;border:1px solid #eee}
ul.problems{color:#8a5300} pre{white-space:pre-wrap;margin:0}
"""

_RUN_COLUMNS = [
    ("run", "run"),
    ("status", "status"),
    ("model", "model"),
    ("method", "method"),
    ("objective", "objective"),
    ("steps", "steps"),
    ("tokens", "tokens"),
    ("time_s", "time (s)"),
    ("tokens_per_s", "tokens/s"),
    ("peak_mem_gb", "peak mem (GB)"),
    ("final_train_loss", "final train loss"),
    ("initial_eval_loss", "first eval loss"),
    ("final_eval_loss", "final eval loss"),
    ("reward_accuracy", "reward acc"),
    ("reward_margin", "reward margin"),
    ("eval_reward_accuracy", "eval reward acc"),
    ("reward", "reward (GRPO)"),
    ("eval_perplexity", "eval ppl"),
    ("eval_exact_match", "EM"),
    ("eval_chrf", "chrF"),
    ("eval_rouge_l", "ROUGE-L"),
    ("delta_loss", "Δ loss vs base"),
    ("delta_chrf", "Δ chrF vs base"),
]


def _cell(value: Any) -> str:
    if value is None:
        return "<td>-</td>"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{html.escape(str(value))}</td>"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f'<td class="num">{int(value):,}</td>'
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return f'<td class="num">{text}</td>'


def _table(rows: list[dict], columns: list[tuple[str, str]], table_id: str) -> str:
    columns = [(k, title) for k, title in columns if any(r.get(k) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            if key == "status" and row.get(key) in ("complete", "incomplete"):
                cells.append(f'<td class="{row[key]}">{row[key]}</td>')
            else:
                cells.append(_cell(row.get(key)))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _problems_html(runs: list[Run]) -> str:
    items = [f"<li>{html.escape(run.name)}: {html.escape(p)}</li>" for run in runs for p in run.problems]
    return f'<h2>Notes</h2><ul class="problems">{"".join(items)}</ul>' if items else ""


def render_html(runs: list[Run], charts: dict[str, bytes]) -> str:
    """The page: headline, table of runs, benchmark table, charts (embedded as base64), samples, notes."""
    training = [r for r in runs if r.is_training or r.eval_result]
    benches = [r for r in runs if r.bench]
    images = "".join(
        f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in charts.items()
    )
    bench_columns = [(k, k) for k in bench_row(benches[0])] if benches else []
    sections = [
        f"<h1>aift report</h1><p class='sub'>{len(runs)} run(s), {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<h2>Runs</h2>" + _table([run_row(r) for r in training], _RUN_COLUMNS, "runs") if training else "",
        "<h2>Benchmarks</h2>" + _table([bench_row(r) for r in benches], bench_columns, "bench") if benches else "",
        f'<h2>Charts</h2><div class="charts">{images}</div>' if images else "",
        samples_html(runs),
        completions_html(runs),
        _problems_html(runs),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>aift report</title>'
        f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>\n"
    )


def build_report(paths: list[str | Path], output: str | Path = "report") -> Path:
    """Writes OUTPUT/report.html (self-contained) and the charts as PNGs beside it; returns the HTML path.

    Args:
        paths: Run dirs, or folders holding run dirs (searched a few levels deep).
        output: The folder to write into (created when missing).
    """
    runs = discover_runs(list(paths))
    charts = make_charts(runs)
    output = Path(output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    for name, png in charts.items():
        write_bytes_atomic(output / name, png)
    page = output / "report.html"
    write_bytes_atomic(page, render_html(runs, charts).encode("utf-8"))
    return page
