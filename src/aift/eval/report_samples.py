"""The report's sample sections: eval answers (eval.json) and GRPO's sampled completions (completions.jsonl)."""

from __future__ import annotations

import html
from typing import Any

COMPLETIONS_SHOWN = 8  # completions of a run's last logged step shown in the report (the file keeps them all)


def _pre(value: Any) -> str:
    return f"<td><pre>{html.escape(str(value))}</pre></td>"


def samples_html(runs: list) -> str:
    """Each run's eval samples as a table (prompt, reference, fine-tuned, base answers)."""
    parts = []
    for run in runs:
        samples = (run.eval_result or {}).get("samples") or []
        if not samples or not isinstance(samples[0], dict):
            continue
        keys = list(samples[0])
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(_pre(s.get(k, "")) for k in keys) + "</tr>" for s in samples)
        parts.append(f"<h3>{html.escape(run.name)}</h3><table><tr>{head}</tr>{body}</table>")
    return "<h2>Sample answers</h2>" + "".join(parts) if parts else ""


def completions_html(runs: list) -> str:
    """GRPO runs: the last logged step's prompts, completions, rewards per function and advantages."""
    parts = []
    for run in runs:
        records = [r for r in run.completions if isinstance(r, dict) and "completion" in r]
        if not records:
            continue
        step = max(r.get("step", 0) for r in records)
        shown = [r for r in records if r.get("step", 0) == step][:COMPLETIONS_SHOWN]
        names = sorted({name for r in shown for name in (r.get("rewards") or {})})
        head = "".join(
            f"<th>{html.escape(h)}</th>" for h in ["group", "prompt", "completion", *names, "reward", "advantage"]
        )
        body = "".join(
            "<tr>"
            + _pre(r.get("group", ""))
            + _pre(r.get("prompt", ""))
            + _pre(r.get("completion", ""))
            + "".join(_pre((r.get("rewards") or {}).get(n, "")) for n in names)
            + _pre(r.get("reward", ""))
            + _pre(r.get("advantage", ""))
            + "</tr>"
            for r in shown
        )
        parts.append(f"<h3>{html.escape(run.name)}: step {step}</h3><table><tr>{head}</tr>{body}</table>")
    return "<h2>Sampled completions (GRPO)</h2>" + "".join(parts) if parts else ""
