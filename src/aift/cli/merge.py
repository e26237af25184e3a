"""`aift merge --adapter DIR --output DIR [--base M] [--dtype bf16] [--base-weights original|dequantized]`:
fold a LoRA adapter into its base."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json), e.g. RUN/final")
    parser.add_argument("--base", default=None, help="base model (default: the one the adapter names)")
    parser.add_argument("--output", required=True, help="folder to write the merged model into")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="dtype of the merged weights")
    parser.add_argument(
        "--base-weights",
        default="original",
        choices=("original", "dequantized"),
        help="original: the base's own weights (W + BA); dequantized: for a QLoRA adapter, the base quantized as in "
        "training then dequantized (dequant(quant(W)) + BA), which reproduces the trained model exactly",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    from aift.export.merge import merge_adapter

    path = merge_adapter(
        args.adapter,
        args.output,
        base=args.base,
        dtype=args.dtype,
        overwrite=args.overwrite,
        base_weights=args.base_weights,
    )
    print(f"merged model saved to {path} ({args.base_weights} base weights)")
    return 0
