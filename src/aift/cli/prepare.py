"""`aift prepare`: raw data -> tokenized, loss-masked train/test splits (see aift.data.prepare).

``--task preference`` reads preference pairs (or KTO's labelled examples) instead (see aift.data.preference).
"""

from __future__ import annotations

import argparse

from aift.data.formats import FORMAT_CHOICES
from aift.data.sources import SOURCES
from aift.models.registry import EMBEDDED_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=EMBEDDED_MODEL, help=f"model name, hub id or folder (default {EMBEDDED_MODEL})"
    )
    parser.add_argument(
        "--source", default=None, help=f"one of {', '.join(SOURCES)} (default: from the --source-path suffix)"
    )
    parser.add_argument(
        "--source-path", help="local data file (for alpaca/dolly/wizardlm: a local copy in that schema)"
    )
    parser.add_argument("--num-samples", type=int, help="use only the first N rows")
    parser.add_argument("--format", default="auto", help=f"prompt format: {', '.join(FORMAT_CHOICES)} (default auto)")
    parser.add_argument("--output-dir", help="default datasets/{source}_{model basename}_{num-samples or all}")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per example; the prompt is cut first")
    parser.add_argument("--val-ratio", type=float, default=0.05, help="share of examples in the test split")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/test split")
    parser.add_argument("--train-on-prompt", action="store_true", help="train on all tokens, not only the answers")
    parser.add_argument("--system", help="system prompt for conversations without one")
    parser.add_argument("--strict", action="store_true", help="fail on the first unusable row instead of dropping it")
    parser.add_argument(
        "--task",
        default="sft",
        choices=("sft", "preference"),
        help="sft (conversations) or preference (chosen/rejected pairs, or KTO rows with a label)",
    )
    parser.add_argument(
        "--num-proc", type=int, help="tokenizer worker processes (default: every core; small files use fewer)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow tokenizers with code from the hub")


def run(args: argparse.Namespace) -> int:
    shared = dict(
        model=args.model,
        source=args.source,
        source_path=args.source_path,
        num_samples=args.num_samples,
        format=args.format,
        output_dir=args.output_dir,
        max_length=args.max_length,
        val_ratio=args.val_ratio,
        seed=args.seed,
        system=args.system,
        strict=args.strict,
        trust_remote_code=args.trust_remote_code,
    )
    if args.task == "preference":
        from aift.data import DataError
        from aift.data.preference import prepare_preference

        if args.source in ("alpaca", "dolly", "wizardlm") or args.train_on_prompt:
            raise DataError("--task preference reads a local file (--source-path) and trains on the answers only")
        print(prepare_preference(**shared))
        return 0
    from aift.data.prepare import prepare_dataset

    print(prepare_dataset(**shared, train_on_prompt=args.train_on_prompt, num_proc=args.num_proc))
    return 0
