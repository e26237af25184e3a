"""`aift serve --model M [--adapter NAME=PATH ...]`: an OpenAI-compatible HTTP server (see aift.serve)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from aift.data.formats import FORMAT_CHOICES
from aift.errors import AiftError

log = logging.getLogger(__name__)


def _adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base, merged, quantized or adapter folder")
    parser.add_argument(
        "--adapter",
        type=_adapter,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter of --model under NAME (repeatable; the base is served too)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the name of --model in /v1/models (default: as given)"
    )
    parser.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="prompt format (auto: as trained)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("AIFT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $AIFT_API_KEY, better: ps shows the command line)",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests of one model decoded together")
    parser.add_argument(
        "--batching",
        default="continuous",
        choices=["continuous", "static"],
        help="continuous: requests join and leave the running batch at each token; static: a batch runs to its "
        "last request (the old behaviour, to compare)",
    )
    parser.add_argument("--max-pending", type=int, default=256, help="requests waiting or running before 429")
    parser.add_argument("--max-tokens", type=int, default=512, help="answer length when a request sets none")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from aift.serve import Engine, create_app, load_served_models

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise AiftError("two --adapter options have the same NAME")
    models = load_served_models(
        args.model,
        adapters,
        name=args.served_model_name,
        device=args.device,
        prompt_format=args.format,
        trust_remote_code=args.trust_remote_code,
    )
    engine = Engine(
        models,
        max_batch=args.max_batch,
        max_pending=args.max_pending,
        default_max_tokens=args.max_tokens,
        batching=args.batching,
    )
    if not args.api_key and not _is_loopback(args.host):
        log.warning("warning: listening on %s with no --api-key: anyone who can reach it can use it", args.host)
    names = ", ".join(engine.models)
    log.info("serving %s on http://%s:%d/v1%s", names, args.host, args.port, " (API key required)" * bool(args.api_key))
    try:
        uvicorn.run(create_app(engine, api_key=args.api_key), host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0
