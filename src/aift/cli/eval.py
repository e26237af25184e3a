"""`aift eval`: loss, perplexity and (with --generate) EM / chrF / ROUGE-L on a prepared split.

aift eval --model out/run1 --dataset-path data/prepared --generate --compare-base --output out/run1/eval.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from aift.eval.evaluate import COMPARED_METRICS

# Which direction is better, for the arrow printed beside each difference.
_LOWER_IS_BETTER = {"loss", "perplexity"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="base model (alias, folder or hub id), a training output dir, an adapter or a fine-tuned folder",
    )
    parser.add_argument("--adapter", help="LoRA adapter folder (or training output dir) to put on --model")
    parser.add_argument("--dataset-path", required=True, help="folder written by `aift prepare`")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--max-samples", type=int, help="score only the first N rows")
    parser.add_argument("--generate", action="store_true", help="also generate greedy answers and score them")
    parser.add_argument("--compare-base", action="store_true", help="evaluate the base model too and print the gain")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit (default: 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default: 4)")
    parser.add_argument("--num-shown", type=int, default=3, help="answers shown beside their references (default: 3)")
    parser.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-8bit", action="store_true", help="load the base model in 8-bit (bitsandbytes)")
    quant.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4-bit, as QLoRA trains")
    parser.add_argument("--output", help="write every figure to this JSON file")


def run(args: argparse.Namespace) -> int:
    from aift.errors import AiftError
    from aift.eval.evaluate import evaluate, write_json

    for name in ("max_samples", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AiftError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    result = evaluate(
        args.model,
        args.dataset_path,
        adapter=args.adapter,
        split=args.split,
        max_samples=args.max_samples,
        generate=args.generate,
        compare_base=args.compare_base,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_shown=args.num_shown,
        device=args.device,
        load_in_8bit=args.load_in_8bit,
        load_in_4bit=args.load_in_4bit,
    )
    print_result(result)
    if args.output:
        print(f"wrote {write_json(result, args.output)}")
    else:
        print(json.dumps({"metrics": result["metrics"], "delta": result.get("delta")}, ensure_ascii=False))
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _fmt_delta(name: str, delta: float) -> str:
    better = delta < 0 if name in _LOWER_IS_BETTER else delta > 0
    mark = "[green]better[/]" if better else ("[red]worse[/]" if delta else "same")
    return f"{delta:+.4f} {mark}"


def print_result(result: dict[str, Any]) -> None:
    """A short table of metrics (base, fine-tuned, difference) and the sample answers beside the references."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    base = result.get("base_metrics")
    table = Table(title=f"aift eval: {result['split']} split, {result['examples']} examples")
    table.add_column("metric")
    if base is not None:
        table.add_column("base", justify="right")
    table.add_column("fine-tuned" if base is not None or result["adapter"] or result["finetuned_model"] else "model")
    if base is not None:
        table.add_column("difference", justify="right")
    for name in (*COMPARED_METRICS, "trained_tokens"):
        if name not in result["metrics"]:
            continue
        row = [name]
        if base is not None:
            row.append(_fmt(base[name]))
        row.append(_fmt(result["metrics"][name]))
        if base is not None and name in result.get("delta", {}):
            row.append(_fmt_delta(name, result["delta"][name]))
        table.add_row(*row)
    console.print(table)
    _print_samples(console, result.get("samples") or [])


def _print_samples(console, samples: list[dict[str, str]]) -> None:
    from rich.table import Table
    from rich.text import Text

    if not samples:
        return
    answer_keys = [k for k in samples[0] if k not in ("prompt", "reference")]
    table = Table(title="sample answers", show_lines=True)
    for column in ("prompt (end)", "reference", *answer_keys):
        table.add_column(column, overflow="fold")
    for sample in samples:
        prompt = sample["prompt"].strip()
        cells = [prompt[-80:], sample["reference"], *(sample[k] for k in answer_keys)]
        table.add_row(*map(Text, cells))  # Text: brackets in model output are not rich markup
    console.print(table)
