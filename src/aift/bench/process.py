"""One trainer of a method's benchmark in its own process: the parent's call and the worker's ``main``.

A method's bench module (``aift.bench.preference``, ``aift.bench.grpo``) is also its worker:
``python -m MODULE SPEC.json RESULT.json`` runs the trainer the spec names and writes its figures. A fresh process
per trainer makes the peak memory (the process's peak RSS, or the GPU's max allocated) that trainer's alone.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aift.errors import AiftError
from aift.utils.files import write_json_atomic


def run_worker(module: str, spec: dict, logs: Path, what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``python -m module`` on ``spec`` (its output kept in logs/TRAINER.log); returns the worker's result.

    ``what`` names the run in the error (``the trl GRPO run failed ...``); ``env``: the worker's environment
    (default: this process's; :func:`aift.bench.core.worker_env` chooses the allocator).
    """
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        log_file = logs / f"{spec['trainer']}.log"
        with log_file.open("w", encoding="utf-8") as f:
            code = subprocess.call([sys.executable, "-m", module, str(spec_path), str(result_path)],
                                   stdout=f, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        if code != 0 or not result_path.is_file():
            raise AiftError(f"the {spec['trainer']} {what} run failed (exit {code}); see {log_file}")
        return json.loads(result_path.read_text(encoding="utf-8"))


def worker_main(argv: list[str], runners: dict[str, Callable[[dict], dict[str, Any]]]) -> int:
    """The worker's side: SPEC.json RESULT.json -> the trainer's figures, seeded by the spec's seed."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.manual_seed(spec["seed"])
    write_json_atomic(Path(result_path), runners[spec["trainer"]](spec))
    return 0
