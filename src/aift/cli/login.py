"""`aift login`: store a Hugging Face token where huggingface_hub reads it, mode 0600, never echoed."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from aift.errors import AiftError
from aift.utils.files import write_text_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-stdin", action="store_true", help="read the token from standard input (for scripts)")


def token_path() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_TOKEN_PATH)


def store_token(token: str, path: Path | None = None) -> Path:
    """Writes the token atomically with mode 0600; returns the file's path."""
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise AiftError("that does not look like a token (empty, or contains spaces)")
    path = path or token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, token, mode=0o600)
    return path


def run(args: argparse.Namespace) -> int:
    token = sys.stdin.readline() if args.token_stdin else getpass.getpass("Hugging Face token (input hidden): ")
    path = store_token(token)
    print(f"token stored in {path} (mode 0600)")
    return 0
