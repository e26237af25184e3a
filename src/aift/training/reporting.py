"""Where training metrics go: metrics.jsonl always, TensorBoard by default, W&B or MLflow when asked."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from aift.errors import NotAvailableError
from aift.models.run_folder import METRICS_FILE, TENSORBOARD_DIR
from aift.utils.files import read_jsonl, write_text_atomic

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(report_to: list[str]) -> None:
    """Fails before training when a requested logger's package is missing."""
    for name in report_to:
        package = _PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise NotAvailableError(
                f"report_to names {name!r} but the {package} package is not installed: "
                f"`pip install {package}`, or drop it from report_to"
            )


class MetricsLogger:
    """Appends one JSON object per event to metrics.jsonl and mirrors scalars to the requested loggers."""

    def __init__(self, output_dir: Path, report_to: list[str], run_config: dict, resume_step: int | None):
        self.path = output_dir / METRICS_FILE
        if resume_step is not None:
            self._drop_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
        if "wandb" in report_to:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "aift"), config=run_config, dir=str(output_dir), resume="allow"
            )
        if "mlflow" in report_to:
            import mlflow

            self._mlflow = mlflow
            mlflow.start_run()
            mlflow.log_params({k: str(v)[:250] for k, v in run_config.items()})

    def _drop_after(self, step: int) -> None:
        """On resume, forget the records of steps the interrupted run did after its checkpoint."""
        if not self.path.exists():
            return
        kept = [record for record in read_jsonl(self.path) if record.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {
            f"{record['type']}/{k}": v
            for k, v in record.items()
            if k not in ("type", "step", "time") and isinstance(v, (int, float))
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()
