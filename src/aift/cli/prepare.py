"""`aift prepare`: raw data -> tokenized, loss-masked train/test splits (see aift.data.prepare).

``--task`` picks one of ``aift.data.prepare.TASKS``: sft (the default), preference pairs (or KTO's labelled
examples, see aift.data.preference) or pretrain (raw text, aift.data.pretrain). ``--mix`` puts several sources
in one dataset (aift.data.mixture).
"""

from __future__ import annotations

import argparse

from aift.data.formats import FORMAT_CHOICES
from aift.data.prepare import TASKS
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
    parser.add_argument(
        "--drop-earlier-thinking",
        action="store_true",
        help="remove <think> reasoning from answers before the last user message (as Qwen3's template does)",
    )
    parser.add_argument("--strict", action="store_true", help="fail on the first unusable row instead of dropping it")
    parser.add_argument(
        "--task",
        default="sft",
        choices=tuple(TASKS),
        help="; ".join(f"{name}: {task.summary}" for name, task in TASKS.items()) + " (default sft)",
    )
    parser.add_argument(
        "--num-proc", type=int, help="tokenizer worker processes (default: every core; small files use fewer)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow tokenizers with code from the hub")
    pretrain = parser.add_argument_group("--task pretrain (raw text)")
    pretrain.add_argument(
        "--text-column", help="the column of JSONL/CSV/Parquet rows holding a document (default text)"
    )
    pretrain.add_argument("--min-doc-tokens", type=int, help="drop documents with fewer tokens (EOS included)")
    mix = parser.add_argument_group("several sources")
    mix.add_argument(
        "--mix",
        metavar="PATH:WEIGHT,... | MIX.yaml",
        help="mix sources (each of --task), or a YAML 'datasets:' list of {path, task, weight | samples, split}",
    )
    stream = parser.add_argument_group("--task pretrain --streaming (a corpus larger than memory)")
    stream.add_argument(
        "--streaming",
        action="store_true",
        help="record the corpus and tokenize and pack it while training (needs --max-steps there); "
        "only the held-out split is written",
    )
    stream.add_argument(
        "--eval-documents",
        type=int,
        default=100,
        help="with --streaming: the first N documents are held out for eval, never trained (default 100); "
        "--val-ratio does not apply",
    )


def run(args: argparse.Namespace) -> int:
    from aift.data.prepare import prepare

    if args.streaming:
        return _run_streaming(args)
    if args.mix:
        return _run_mix(args)
    out = prepare(
        args.task,
        model=args.model,
        source=args.source,
        source_path=args.source_path,
        num_samples=args.num_samples,
        format=args.format,
        output_dir=args.output_dir,
        max_length=args.max_length,
        val_ratio=args.val_ratio,
        seed=args.seed,
        train_on_prompt=args.train_on_prompt,
        system=args.system,
        strict=args.strict,
        trust_remote_code=args.trust_remote_code,
        num_proc=args.num_proc,
        min_doc_tokens=args.min_doc_tokens,
        text_column=args.text_column,
        drop_earlier_thinking=args.drop_earlier_thinking,
    )
    print(out)
    return 0


def _run_mix(args: argparse.Namespace) -> int:
    from aift.data import DataError
    from aift.data.mixture import prepare_mixture

    if args.source or args.source_path:
        raise DataError("--mix names its sources: leave out --source and --source-path")
    if args.num_samples or args.train_on_prompt:
        raise DataError("--mix: give each source its samples in the YAML; --num-samples/--train-on-prompt do not apply")
    out = prepare_mixture(
        args.mix,
        model=args.model,
        task=args.task,
        format=args.format,
        output_dir=args.output_dir,
        max_length=args.max_length,
        val_ratio=args.val_ratio,
        seed=args.seed,
        system=args.system,
        strict=args.strict,
        trust_remote_code=args.trust_remote_code,
        num_proc=args.num_proc,
        min_doc_tokens=args.min_doc_tokens,
    )
    print(out)
    return 0


def _run_streaming(args: argparse.Namespace) -> int:
    from aift.data import DataError
    from aift.data.streaming import prepare_streaming

    if args.task != "pretrain":
        raise DataError(f"--streaming streams raw text: use it with --task pretrain, not --task {args.task}")
    if args.mix:
        raise DataError("--streaming streams one corpus (a file, folder or glob): --mix is not supported with it")
    if args.num_samples or args.train_on_prompt or args.drop_earlier_thinking or args.system:
        raise DataError("--streaming trains every token of every document: --num-samples, --train-on-prompt, "
                        "--system and --drop-earlier-thinking do not apply")  # fmt: skip
    out = prepare_streaming(
        args.model,
        args.source_path,
        source=args.source,
        output_dir=args.output_dir,
        max_length=args.max_length,
        seed=args.seed,
        text_column=args.text_column,
        min_doc_tokens=args.min_doc_tokens,
        eval_documents=args.eval_documents,
        format=args.format,
        trust_remote_code=args.trust_remote_code,
    )
    print(out)
    return 0
