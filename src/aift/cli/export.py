"""`aift export --model DIR [--adapter DIR] --format gguf|safetensors [--quant q8_0] --output PATH`.

A GGUF export is read back with transformers and compared with its source before the command says ok.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or alias (or an adapter folder)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter to merge in first")
    parser.add_argument("--format", choices=("gguf", "safetensors"), default="gguf", help="output format")
    parser.add_argument(
        "--quant", choices=("f32", "f16", "bf16", "q8_0"), default="f16", help="GGUF storage type (norms stay f32)"
    )
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="safetensors: weight dtype")
    parser.add_argument("--output", required=True, help="FILE.gguf, or a folder for safetensors")
    parser.add_argument("--no-verify", action="store_true", help="GGUF: skip the read-back comparison")
    parser.add_argument("--overwrite", action="store_true", help="safetensors: replace a non-empty output folder")


def run(args: argparse.Namespace) -> int:
    from aift.errors import AiftError
    from aift.models.run_folder import is_adapter_dir

    adapter = args.adapter or (args.model if is_adapter_dir(args.model) else None)
    base = None if adapter == args.model else args.model
    if args.format == "safetensors":
        return _export_safetensors(args, adapter, base)
    if not args.output.endswith(".gguf"):
        raise AiftError(f"--output {args.output} should be a .gguf file for --format gguf")
    if adapter is None:
        return _export_gguf(args.model, args)
    # A GGUF is written from a plain folder: merge into a temp folder (fp32, so --quant alone decides precision).
    from aift.export.merge import merge_adapter

    with tempfile.TemporaryDirectory(prefix=".aift-merge-", dir=Path(args.output).parent or ".") as tmp:
        merged = merge_adapter(adapter, Path(tmp) / "merged", base=base, dtype="fp32")
        return _export_gguf(str(merged), args)


def _export_safetensors(args: argparse.Namespace, adapter: str | None, base: str | None) -> int:
    from aift.export.merge import merge_adapter, save_plain_folder

    if adapter:
        path = merge_adapter(adapter, args.output, base=base, dtype=args.dtype or "bf16", overwrite=args.overwrite)
    else:
        path = save_plain_folder(args.model, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"saved safetensors model to {path}")
    return 0


def _export_gguf(folder: str, args: argparse.Namespace) -> int:
    from aift.export.gguf_writer import export_gguf

    path = export_gguf(folder, args.output, quant=args.quant)
    print(f"wrote {path} ({args.quant}, {path.stat().st_size / 1e6:.1f} MB)")
    if args.no_verify:
        return 0
    from aift.export.verify import verify_gguf

    report = verify_gguf(folder, path, args.quant)
    print(
        f"read-back: tokens {'same' if report['tokens_match'] else 'DIFFERENT'}, "
        f"max |logit diff| {report['max_abs_logit_diff']:.4g}, mean KL {report['mean_kl']:.3g}, "
        f"greedy 20 tokens {'identical' if report['greedy_match'] else 'DIFFERENT'}"
    )
    print(f"  source:   {report['source_text']!r}\n  exported: {report['exported_text']!r}")
    if not report["passed"]:
        print("read-back check FAILED: the exported file does not behave like its source")
        return 1
    print("read-back check passed")
    return 0
