"""`aift webui [--runs-dir runs] [--port 7860]`: the browser studio (data, training, runs, chat, merge/export).

Runs live as folders under --runs-dir, so a restarted UI shows the same runs (and those of `aift train`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="folder of training runs, one folder each (default runs/)")
    parser.add_argument(
        "--data-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="folder whose data files and prepared datasets the UI may read (repeatable; default data/ and "
        "datasets/); RUNS/datasets/ is always one",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")


def run(args: argparse.Namespace) -> int:
    from aift.errors import NotAvailableError

    try:
        import uvicorn

        from aift.webui.app import create_app
    except ImportError as e:
        raise NotAvailableError(f"aift webui needs FastAPI and uvicorn: pip install 'aift[webui]' ({e})") from e
    if not _is_loopback(args.host):
        log.warning("warning: binding %s: anyone who can reach this address can train and read runs", args.host)
    app = create_app(args.runs_dir, args.data_dir, host=args.host)
    print(f"aift webui: http://{args.host}:{args.port}/  (runs in {app.state.runs_dir}; Ctrl-C to stop)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
