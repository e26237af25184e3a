"""`aift bench`: aift's trainer (and, with --compare trl, TRL's SFTTrainer) on the same data, measured alike."""

from __future__ import annotations

import argparse

from aift.bench.core import BenchOptions, run_bench
from aift.bench.grpo import GRPOBenchOptions
from aift.bench.report import summary_line
from aift.cli.flags import add_field_flag
from aift.config import OPTIMIZERS, TrainingConfig
from aift.errors import AiftError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchOptions()
    parser.add_argument("--model", default=d.model, help="Model alias or folder (default: %(default)s).")
    # Not `aift train --method`: which weights train (as `aift plan --method`), or the DPO bench.
    parser.add_argument(
        "--method",
        choices=("lora", "qlora", "full", "dpo", "grpo"),
        default=d.method,
        help="SFT with lora/qlora/full, LoRA DPO on preference pairs (--compare trl: TRL's DPOTrainer), or LoRA GRPO "
        "on sums with exact_match (--compare trl: TRL's GRPOTrainer).",
    )
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="Tokens per row (default: %(default)s).")
    parser.add_argument("--examples", type=int, default=d.examples, help="Training examples, one epoch.")
    parser.add_argument(
        "--eval-examples", type=int, default=None, help="Held-out examples (default: examples/3, <=32)."
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="Examples per optimizer step.")
    add_field_flag(
        parser,
        TrainingConfig,
        "learning_rate",
        default=d.learning_rate,
        differs_because="the committed result's (a LoRA rate); --method dpo takes the DPO bench's own unless given.",
    )
    parser.add_argument(
        "--optimizer",
        default=",".join(d.optimizer),
        metavar="NAME[,NAME...]",
        help="aift's optimizer (TrainingConfig.optimizer: " + ", ".join(OPTIMIZERS) + "). A list such as "
        "adamw,adamw_8bit,muon trains aift once per optimizer and adds a table of tokens/s, peak memory and "
        "optimizer state (default: %(default)s).",
    )
    parser.add_argument("--compare", choices=("trl",), default=None, help="Also train with TRL's SFTTrainer.")
    parser.add_argument("--output", default=d.output, help="Folder for result.json, results.md, chart.png, logs/.")
    parser.add_argument("--data", default=None, help="JSON/JSONL rows (alpaca or messages) instead of synthetic data.")
    parser.add_argument("--ablation", action="store_true", help="Also run aift with each lever switched off alone.")
    parser.add_argument("--compile", action="store_true", help="torch.compile aift's model (compile time reported).")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("on", "off", "selective"),
        default="on" if d.gradient_checkpointing else "off",
        help="Recompute activations in backward, for aift and TRL alike (default: %(default)s, both trainers' "
        "default). selective: aift keeps its layers' GEMM outputs and recomputes only element-wise ops (TRL has "
        "only full checkpointing, which it then runs).",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default=d.precision,
        help="Both trainers alike; auto: bf16 where the device multiplies bf16 in hardware, else fp32 "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--task",
        choices=("sort", "larger"),
        default="sort",
        help="--method dpo: the preference pairs (sort a list; or pick the larger of two numbers).",
    )
    parser.add_argument("--numbers", type=int, default=24, help="--method dpo --task sort: numbers per list.")
    g = GRPOBenchOptions()
    parser.add_argument(
        "--num-generations", type=int, default=g.num_generations, help="--method grpo: completions per prompt."
    )
    parser.add_argument(
        "--max-completion-length",
        type=int,
        default=g.max_completion_length,
        help="--method grpo: most new tokens per completion (default: %(default)s).",
    )
    parser.add_argument(
        "--nproc",
        default="1",
        metavar="N[,N...]",
        help="Train aift's run in N processes (torchrun; DDP over gloo on CPU). A list such as 1,2 runs each count "
        "and adds a scaling table (tokens/s, speedup, efficiency) and scaling.png (default: %(default)s).",
    )


def run(args: argparse.Namespace) -> int:
    if args.method in ("dpo", "grpo"):
        return _run_method_bench(args)
    options = BenchOptions(
        model=args.model,
        method=args.method,
        seq_len=args.seq_len,
        examples=args.examples,
        eval_examples=args.eval_examples,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        compare=args.compare,
        output=args.output,
        data=args.data,
        ablation=args.ablation,
        compile=args.compile,
        tcmalloc=not getattr(args, "no_tcmalloc", False),  # the flag exists when run through the CLI table
        seed=args.seed,
        nproc=args.nproc,
        gradient_checkpointing={"on": True, "off": False}.get(args.gradient_checkpointing, "selective"),
        precision=args.precision,
        optimizer=args.optimizer,
    )
    result = run_bench(options)
    charts = "chart.png, scaling.png" if len(result["scaling"]) > 1 or options.nproc[0] > 1 else "chart.png"
    print(f"wrote {options.output}/result.json, results.md, {charts}")
    print(summary_line(result))
    return 0


def _given(args: argparse.Namespace, name: str, method_default):
    """The flag's value when the user gave it; else the method bench's own default (not the SFT bench's)."""
    value = getattr(args, name)
    return method_default if value == getattr(BenchOptions(), name) else value


def _run_method_bench(args: argparse.Namespace) -> int:
    """--method dpo or grpo: that method's bench (aift.bench.preference / aift.bench.grpo)."""
    if args.optimizer != ",".join(BenchOptions().optimizer):
        raise AiftError(f"--optimizer is for the SFT bench (--method lora, qlora or full), not --method {args.method}")
    if args.method == "dpo":
        from aift.bench.preference import PreferenceBenchOptions, run_bench, summary_line

        d = PreferenceBenchOptions()
        options = PreferenceBenchOptions(
            eval_examples=args.eval_examples or d.eval_examples,
            batch_size=args.batch_size,
            max_length=min(args.seq_len, d.max_length) if args.seq_len == BenchOptions().seq_len else args.seq_len,
            task=args.task,
            numbers=args.numbers,
            **_shared(args, d),
        )
    else:
        from aift.bench.grpo import run_bench, summary_line

        options = GRPOBenchOptions(
            batch_size=_given(args, "batch_size", GRPOBenchOptions().batch_size),
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            data=args.data,
            **_shared(args, GRPOBenchOptions()),
        )
    result = run_bench(options)
    written = "result.json, results.md" + (", chart.png" if args.method == "grpo" else "")
    print(f"wrote {options.output}/{written}")
    print(summary_line(result))
    return 0


def _shared(args: argparse.Namespace, defaults) -> dict:
    """The options every method bench takes, each the method's default unless the flag was given."""
    return {
        "model": args.model,
        "examples": _given(args, "examples", defaults.examples),
        "learning_rate": _given(args, "learning_rate", defaults.learning_rate),
        "compare": args.compare,
        "output": _given(args, "output", defaults.output),
        "seed": args.seed,
        "gradient_checkpointing": args.gradient_checkpointing == "on",
        "precision": args.precision,
    }
