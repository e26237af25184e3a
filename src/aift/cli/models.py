"""`aift models`: the registry as a table."""

from __future__ import annotations

import argparse

from aift.models.registry import SUPPORTED_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", action="store_true", help="show each model's prompt format and remote-code need")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="aift models")
    table.add_column("model")
    table.add_column("name")
    table.add_column("params", justify="right")
    table.add_column("min GPU GB", justify="right")
    table.add_column("gated")
    table.add_column("method")
    if args.formats:
        table.add_column("format")
        table.add_column("remote code")
    for spec in SUPPORTED_MODELS.values():
        params = f"{spec.params_b * 1000:.0f}M" if spec.params_b < 1 else f"{spec.params_b:g}B"
        row = [
            spec.name,
            spec.display_name,
            params,
            f"{spec.min_gpu_memory_gb:g}",
            "yes" if spec.gated else "no",
            spec.recommended_method,
        ]
        if args.formats:
            row += [spec.prompt_format, "yes" if spec.trust_remote_code else "no"]
        table.add_row(*row)
    Console(width=200).print(table)
    return 0
