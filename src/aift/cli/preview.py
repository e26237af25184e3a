"""`aift preview DATASET_DIR`: prepared examples with the trained tokens highlighted (`[[...]]` when not a terminal)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="a folder written by `aift prepare`")
    parser.add_argument("-n", type=int, default=3, help="number of examples to show (default 3)")
    parser.add_argument("--split", default="train", help="train or test (default train)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from aift.data.preview import preview_dataset

    tty = sys.stdout.isatty()
    console = Console(highlight=False, force_terminal=tty, no_color=not tty, soft_wrap=True)
    if _is_preference(args.dataset_dir):
        return _preview_pairs(args, console, tty)
    preview = preview_dataset(args.dataset_dir, n=args.n, split=args.split)
    info = preview.info
    console.print(
        f"{args.dataset_dir} [{args.split}]: format {info.get('format')}, model {info.get('model')}, "
        f"max_length {info.get('max_length')}",
        markup=False,
    )
    from aift.data.mixture import describe

    for line in describe(info):  # a mixture's sources and their counts
        console.print(line, markup=False)
    legend = "trained tokens in green, thinking in magenta" if tty else "trained tokens in [[...]]"
    for example in preview.examples:
        console.print(
            f"\n--- example {example.index}: {example.trained} trained / {example.masked} masked tokens ({legend})",
            markup=False,
        )
        if tty:
            console.print(styled_text(example))
        else:
            console.print(example.bracketed(), markup=False)
        for warning in example.warnings:
            console.print(f"warning: example {example.index}: {warning}", markup=False)
    total = preview.trained + preview.masked
    share = preview.trained / total if total else 0.0
    console.print(f"\n{args.split}: {preview.trained} trained / {preview.masked} masked tokens ({share:.1%} trained)")
    for warning in preview.warnings:
        console.print(f"warning: {warning}", markup=False)
    return 0


def styled_text(example):
    """An example as rich Text: trained tokens green, masked ones dim, reasoning (``<think>``) magenta."""
    from rich.text import Text

    styles = {
        (True, False): "bold green",
        (False, False): "dim",
        (True, True): "bold magenta",
        (False, True): "magenta",
    }
    return Text.assemble(*((text, styles[trained, thinking]) for text, trained, thinking in example.styled()))


def _is_preference(path: str) -> bool:
    from aift.data.prepared import read_prepare_json

    return read_prepare_json(path).get("task") in ("preference", "kto")


def _preview_pairs(args: argparse.Namespace, console, tty: bool) -> int:
    """Chosen and rejected side by side, trained tokens in green (``[[...]]`` when not a terminal)."""
    from rich.table import Table
    from rich.text import Text

    from aift.data.preference import preview_pairs
    from aift.data.prepared import read_split
    from aift.models.loading import load_tokenizer

    dataset, info = read_split(args.dataset_dir, args.split, with_prepare_json=True)
    tokenizer = load_tokenizer(info["tokenizer"])
    legend = "trained tokens in green" if tty else "trained tokens in [[...]]"
    console.print(
        f"{args.dataset_dir} [{args.split}]: {info.get('task')} data, format {info.get('format')}, "
        f"model {info.get('model')}, {len(dataset)} rows ({legend})",
        markup=False,
    )
    for pair in preview_pairs(dataset, tokenizer, args.n):
        table = Table(show_lines=True, expand=True, title=f"pair {pair.index}" if pair.label is None else
                      f"example {pair.index} (label {str(pair.label).lower()})")  # fmt: skip
        cells = []
        for name, runs in pair.sides.items():
            table.add_column(f"{name}: {pair.trained[name]} trained tokens", ratio=1)
            if tty:
                cells.append(Text.assemble(*((t, "bold green") if on else (t, "dim") for t, on in runs)))
            else:
                cells.append(Text("".join(f"[[{t}]]" if on else t for t, on in runs)))
        table.add_row(*cells)
        console.print(table)
    return 0
