"""The `aift` command: a table of subcommands, each a module with `add_arguments(parser)` and `run(args)`.

A subcommand module is imported only when it is run, so `aift --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from aift import __version__
from aift.errors import AiftError

# name -> (module, one-line summary). Each module defines add_arguments(parser) and run(args) -> int | None.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("aift.cli.models", "List the registered models (--formats: prompt formats)."),
    "recommend": ("aift.cli.recommend", "Suggest a model and method for your GPU memory."),
    "prepare": ("aift.cli.prepare", "Turn raw data into tokenized, loss-masked train/test splits."),
    "preview": ("aift.cli.preview", "Show prepared examples with the trained tokens highlighted."),
    "train": ("aift.cli.train", "Fine-tune (full, LoRA, QLoRA) from a YAML config and/or flags."),
    "eval": ("aift.cli.eval", "Loss, perplexity and generation metrics on a prepared split."),
    "report": ("aift.cli.report", "HTML report with loss curves and a table of runs."),
    "generate": ("aift.cli.generate", "Answer one prompt, streaming."),
    "chat": ("aift.cli.chat", "Multi-turn chat in the terminal."),
    "merge": ("aift.cli.merge", "Merge a LoRA adapter into its base model."),
    "quantize": ("aift.cli.quantize", "Quantize a model to 8 or 4 bits with bitsandbytes."),
    "export": ("aift.cli.export", "Export a model to GGUF or safetensors."),
    "serve": ("aift.cli.serve", "OpenAI-compatible HTTP server (base + several LoRA adapters, batched)."),
    "bench": ("aift.cli.bench", "Benchmark aift's trainer (optionally against TRL)."),
    "plan": ("aift.cli.plan", "Plan device placement and memory for multi-GPU training."),
    "webui": ("aift.cli.webui", "Browser studio: data, training runs, live loss, chat, merge/export."),
    "demo": ("aift.cli.demo", "Fine-tune the embedded model on the bundled Japanese data, before/after."),
    "login": ("aift.cli.login", "Store a Hugging Face token (mode 0600, never echoed)."),
}

# Commands that train start on tcmalloc when it is installed (aift.utils.allocator), unless --no-tcmalloc.
LAUNCHED_COMMANDS = ("train", "bench", "demo")


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (
        f"usage: aift COMMAND [options]   (aift COMMAND --help for its options)\n\n"
        f"aift {__version__}: fine-tune LLMs (full, LoRA, QLoRA), Japanese models first.\n\ncommands:\n{rows}\n"
    )


def build_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand."""
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"aift {name}", description=summary)
    module.add_arguments(parser)
    if name in LAUNCHED_COMMANDS:
        parser.add_argument(
            "--no-tcmalloc", action="store_true", help="Run on the system allocator even when tcmalloc is installed."
        )
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # only a real process entry point may re-execute itself
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed --module aift ...` puts --local_rank=N before the command; LOCAL_RANK is in the env as well.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help(), end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"aift {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"aift: unknown command {name!r}{hint}\n\n{_top_help()}", file=sys.stderr, end="")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from aift.utils.library_noise import install_filters

    install_filters()  # again (import aift did once): a caller's warnings.catch_warnings may have reset them
    try:
        parser = build_parser(name)
    except ModuleNotFoundError as e:
        if e.name != COMMANDS[name][0]:
            raise
        print(f"aift {name}: not implemented yet in this version", file=sys.stderr)
        return 2
    args = parser.parse_args(argv[1:])
    if name in LAUNCHED_COMMANDS and from_command_line:
        from aift.utils.allocator import maybe_reexec_with_tcmalloc

        maybe_reexec_with_tcmalloc(disabled=args.no_tcmalloc)
    try:
        code = args._run(args)
    except AiftError as e:
        print(f"aift {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Training stopped by SIGTERM (Slurm, Kubernetes) after its checkpoint exits 143, like the shell would.
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"aift {name}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 128 + signum
    return int(code or 0)
