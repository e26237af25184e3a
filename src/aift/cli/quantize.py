"""`aift quantize --model M --bits {4,8} --output DIR [--quant-type nf4|fp4] [--benchmark]`."""

from __future__ import annotations

import argparse
import logging

DEFAULT_BENCH_TEXTS = [
    "日本の首都は東京です。東京には多くの美術館や公園があります。",
    "The capital of France is Paris, a city known for its museums.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name, alias or folder")
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True, help="4 (NF4/FP4) or 8 (LLM.int8)")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type")
    parser.add_argument("--no-double-quant", action="store_true", help="4-bit: do not quantize the scales too")
    parser.add_argument("--output", required=True, help="folder to write the quantized model into")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    parser.add_argument("--benchmark", action="store_true", help="compare speed, memory, size and quality")
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes per model for --benchmark")


def run(args: argparse.Namespace) -> int:
    from aift.quant.optimizer import QuantizationOptimizer

    # LLM.int8 logs one line per layer per forward on CPU about casting to fp16; it says nothing new after the first.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    optimizer = QuantizationOptimizer(args.model, device=args.device)
    if args.bits == 8:
        quantized = optimizer.quantize_to_8bit(args.output)
    else:
        quantized = optimizer.quantize_to_4bit(
            args.output, quant_type=args.quant_type, use_double_quant=not args.no_double_quant
        )
    print(f"saved {args.bits}-bit model to {args.output}")
    if args.benchmark:
        report = optimizer.benchmark_quantization(
            optimizer.load_original(), quantized, DEFAULT_BENCH_TEXTS, num_runs=args.runs
        )
        print_report(report, args.bits)
    return 0


def print_report(report: dict, bits: int) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    table = Table(title=f"{bits}-bit quantization")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column(f"{bits}-bit", justify="right")
    rows = [
        ("latency mean (ms)", "latency_ms_mean", ".1f", 1),
        ("latency p50 (ms)", "latency_ms_p50", ".1f", 1),
        ("latency p95 (ms)", "latency_ms_p95", ".1f", 1),
        ("generation (tokens/s)", "generation_tokens_per_s", ".1f", 1),
        ("memory (MB)", "memory_bytes", ".1f", 1e6),
        ("on disk (MB)", "disk_bytes", ".1f", 1e6),
        ("perplexity", "perplexity", ".3f", 1),
    ]
    for label, key, fmt, scale in rows:
        a, b = report["original"][key], report["quantized"][key]
        table.add_row(label, num(a and a / scale, fmt), num(b and b / scale, fmt))
    table.add_row("size ratio (original / quantized)", "", num(report["size_ratio"], ".2f"))
    table.add_row("memory ratio", "", num(report["memory_ratio"], ".2f"))
    table.add_row("mean KL(original || quantized)", "", num(report["kl_divergence"], ".4f"))
    Console(width=120).print(table)
