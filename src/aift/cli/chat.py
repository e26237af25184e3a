"""`aift chat --model M [--adapter DIR]`: multi-turn chat in the terminal (/reset, /exit)."""

from __future__ import annotations

import argparse
import contextlib

from aift.cli.generate import add_generation_arguments, load_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from aift.inference.chat import ChatSession, run_chat

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    loaded, settings = load_from_args(args)
    run_chat(ChatSession(loaded, settings))
    return 0
