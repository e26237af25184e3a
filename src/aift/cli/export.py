"""`aift export --model DIR [--adapter DIR] --format gguf|safetensors [--quant q8_0] --output PATH`.

A GGUF export is read back with transformers and compared with its source before the command says ok.
The export itself (merge -> write -> verify) is :func:`aift.export.run.run_export`, which the web UI calls too.
"""

from __future__ import annotations

import argparse

from aift.export.run import FORMATS, GGUF_QUANTS, SAFETENSORS_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or alias (or an adapter folder)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter to merge in first")
    parser.add_argument("--format", choices=FORMATS, default="gguf", help="output format")
    parser.add_argument("--quant", choices=GGUF_QUANTS, default="f16", help="GGUF storage type (norms stay f32)")
    parser.add_argument("--dtype", choices=SAFETENSORS_DTYPES, default=None, help="safetensors: weight dtype")
    parser.add_argument("--output", required=True, help="FILE.gguf, or a folder for safetensors")
    parser.add_argument("--no-verify", action="store_true", help="GGUF: skip the read-back comparison")
    parser.add_argument("--overwrite", action="store_true", help="safetensors: replace a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    from aift.export.run import run_export

    result = run_export(
        args.model,
        args.output,
        format=args.format,
        adapter=args.adapter,
        quant=args.quant,
        dtype=args.dtype,
        verify=not args.no_verify,
        overwrite=args.overwrite,
    )
    if result.format == "safetensors":
        print(f"saved safetensors model to {result.path}")
        return 0
    print(f"wrote {result.path} ({result.quant}, {result.size_mb:.1f} MB)")
    if result.check is None:
        return 0
    report = result.check
    print(
        f"read-back: tokens {'same' if report['tokens_match'] else 'DIFFERENT'}, "
        f"max |logit diff| {report['max_abs_logit_diff']:.4g}, mean KL {report['mean_kl']:.3g}, "
        f"greedy 20 tokens {'identical' if report['greedy_match'] else 'DIFFERENT'}"
    )
    print(f"  source:   {report['source_text']!r}\n  exported: {report['exported_text']!r}")
    if not result.passed:
        print("read-back check FAILED: the exported file does not behave like its source")
        return 1
    print("read-back check passed")
    return 0
