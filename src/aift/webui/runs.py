"""Training runs as the web UI sees them: folders under runs-dir, their state read from disk only.

A run started from the UI is ``python -m aift train RUN/webui_request.yaml output_dir=RUN`` in its own
process group, stdout and stderr in ``RUN/webui.log``, its pid in ``RUN/webui.pid``. What it is doing
comes from the files the training loop writes (``metrics.jsonl``, ``train_summary.json``, ``checkpoints/``),
so a restarted UI, or one opened on runs started with ``aift train``, shows the same runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import yaml

from aift.config import FRONT_DOOR_DEFAULTS, LR_SCHEDULERS, OPTIMIZERS, LoRAConfig, TrainingConfig
from aift.data.prepared import PREPARE_JSON
from aift.errors import AiftError
from aift.models.run_folder import CONFIG_FILE, FINAL_DIR, MERGED_DIR, METRICS_FILE, SUMMARY_FILE
from aift.training.configs import resolve_train_configs
from aift.utils.files import FileFormatError, read_json_object, read_jsonl, write_text_atomic

REQUEST_FILE = "webui_request.yaml"  # what the user asked for (TrainingConfig keys + lora:)
LOG_FILE = "webui.log"
PID_FILE = "webui.pid"  # "pid create_time" of the training process
EXIT_FILE = "webui.exit"  # its exit code, written by the UI that started it
STOP_FILE = "webui.stop"  # the user pressed stop
DATASETS_DIR = "datasets"  # RUNS/datasets/: data prepared from the UI (never a run)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_TOTAL_STEPS = re.compile(r"training (\d+) steps")
_INTERRUPTED = "aift train: interrupted"  # what the CLI prints when Ctrl-C ended a run
# Fields the UI sets itself (output_dir), or that only runs of several processes or devices use: the UI
# starts one process.
HIDDEN_FIELDS = {
    "output_dir",
    "world_size",
    "strategy",
    "max_memory_per_gpu",
    "pipeline_parallel_size",
    "pipeline_schedule",
}
# Fields offered as a select of their names (the form's text box takes anything, the config checks it).
FIELD_CHOICES = {"optimizer": OPTIMIZERS, "lr_scheduler": LR_SCHEDULERS}
# How a run trains, crossed with the registered method (aift.training.methods.METHODS) it trains with.
ADAPTERS = {
    "lora": "LoRA: small adapters on a frozen base",
    "qlora": "QLoRA: LoRA on a 4-bit (or 8-bit) base",
    "full": "Full fine-tuning: every weight",
}
# The Runs view's charts: (id, title, metric keys of metrics.jsonl). Each method shows its own, as it logs
# them: SFT the loss; DPO, ORPO and SimPO reward margins and accuracies (training/objectives.py); KTO its
# rewards and KL; GRPO its reward and rewards/<fn>.
CURVES = (
    ("loss", "Loss", ("loss",)),
    ("margins", "Reward margin (chosen - rejected)", ("rewards/margins",)),
    ("accuracies", "Reward accuracy (share of pairs with chosen > rejected)", ("rewards/accuracies",)),
    ("rewards", "Implicit rewards", ("rewards/chosen", "rewards/rejected")),
    ("kl", "KL to the reference", ("kl",)),
    ("reward", "Reward", ("reward", "rewards/<fn>")),
)


class WebUIError(AiftError, ValueError):
    """A request the UI cannot carry out; the message says why (shown to the user)."""


def check_name(name: str) -> str:
    """A run or dataset name: one path component of letters, digits, '.', '_' and '-'."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", "..") or name == DATASETS_DIR:
        raise WebUIError(
            f"invalid name {name!r}: use letters, digits, '.', '_' and '-' (at most 80, not starting with "
            f"'.' or '-', not {DATASETS_DIR!r})"
        )
    return name


def run_dir(runs_dir: Path, name: str, must_exist: bool = True) -> Path:
    path = runs_dir / check_name(name)
    if must_exist and not path.is_dir():
        raise WebUIError(f"no run named {name!r} in {runs_dir}")
    return path


def final_dir(path: Path) -> Path:
    """RUN/final, or WebUIError saying the run has no final model yet."""
    final = path / FINAL_DIR
    if not final.is_dir():
        raise WebUIError(f"run {path.name!r} has no final model yet (status: {run_status(path)})")
    return final


def _read_json(path: Path) -> dict | None:
    try:
        return read_json_object(path)
    except (OSError, FileFormatError):
        return None


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of RUN/metrics.jsonl; a half-written last line, or any bad one, is skipped."""
    try:
        records = read_jsonl(path / METRICS_FILE, on_bad_line=lambda problem: None)  # a live view: show the rest
    except OSError:
        return [], []
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    return train, evals


def _live_pid(path: Path) -> int | None:
    """The pid in RUN/webui.pid when that process still runs (same start time, so not a reused pid)."""
    try:
        pid_text, created = (path / PID_FILE).read_text().split()
        process = psutil.Process(int(pid_text))
        if abs(process.create_time() - float(created)) > 1 or process.status() == psutil.STATUS_ZOMBIE:
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    return process.pid


def _exit_code(path: Path) -> int | None:
    try:
        return int((path / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def run_status(path: Path) -> str:
    """done | running | stopped | failed | incomplete, from the run folder alone.

    incomplete: no summary and not started by this UI (a run of `aift train` that crashed or runs elsewhere).
    """
    if (_read_json(path / SUMMARY_FILE) or {}).get("completed"):
        return "done"
    if _live_pid(path) is not None:
        return "running"
    if (path / STOP_FILE).exists() or _exit_code(path) == 130 or _INTERRUPTED in log_tail(path, 5):
        return "stopped"
    return "failed" if (path / PID_FILE).exists() else "incomplete"


def _request(path: Path) -> dict:
    try:
        data = yaml.safe_load((path / REQUEST_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _resolved_config(path: Path) -> dict:
    """config.yaml as the loop wrote it: {"TrainingConfig": {...}, "LoRAConfig": {...}}."""
    try:
        data = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def total_steps(path: Path) -> int | None:
    """The loop's own count ("training N steps" in the log), else max_steps of the config."""
    try:
        with (path / LOG_FILE).open(encoding="utf-8", errors="replace") as f:
            for line in f:
                match = _TOTAL_STEPS.search(line)
                if match:
                    return int(match.group(1))
    except OSError:
        pass
    training = _resolved_config(path).get("TrainingConfig") or _request(path)
    max_steps = training.get("max_steps") if isinstance(training, dict) else None
    return int(max_steps) if isinstance(max_steps, int) and max_steps > 0 else None


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = (path / LOG_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep the last state of each line.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def adapter_of(path: Path) -> str | None:
    """lora | qlora | full: how the run trains (train_summary.json calls it its method)."""
    summary = _read_json(path / SUMMARY_FILE) or {}
    if summary.get("method"):
        return summary["method"]
    lora = _resolved_config(path).get("LoRAConfig") or _request(path).get("lora")
    if not isinstance(lora, dict):
        return "full" if _resolved_config(path) or _request(path) else None
    return "qlora" if lora.get("use_qlora") else "lora"


def method_of(path: Path) -> str | None:
    """The registered method the run trains with (sft, dpo, ...): its request, else a method: of config.yaml."""
    from aift.training.methods import METHODS

    request, config = _request(path), _resolved_config(path)
    if request.get("method") in METHODS:
        return request["method"]
    for section in config.values():  # a method's options section, as the loop wrote it (PreferenceConfig)
        if isinstance(section, dict) and section.get("method") in METHODS:
            return section["method"]
    return "sft" if adapter_of(path) is not None else None  # a run without a method's options: SFT


def run_summary(path: Path) -> dict[str, Any]:
    """One row of the runs list."""
    train, evals = read_metrics(path)
    summary = _read_json(path / SUMMARY_FILE) or {}
    training = _resolved_config(path).get("TrainingConfig") or _request(path)
    return {
        "name": path.name,
        "status": run_status(path),
        "method": method_of(path),
        "adapter": adapter_of(path),
        "model": summary.get("model") or (training or {}).get("model_name"),
        "dataset": (training or {}).get("dataset_path"),
        "step": train[-1]["step"] if train else 0,
        "total_steps": total_steps(path),
        "loss": train[-1].get("loss") if train else None,
        "eval_loss": evals[-1].get("eval_loss") if evals else None,
        "has_final": (path / FINAL_DIR).is_dir(),
        "is_adapter": (path / FINAL_DIR / "adapter_config.json").is_file(),
        "modified": max((p.stat().st_mtime for p in path.iterdir()), default=path.stat().st_mtime),
    }


def run_detail(path: Path) -> dict[str, Any]:
    train, evals = read_metrics(path)
    return {
        **run_summary(path),
        "train": [{k: r.get(k) for k in ("step", "loss", "lr", "tokens_per_s", "epoch")} for r in train],
        "eval": [{k: r.get(k) for k in ("step", "eval_loss", "eval_ppl")} for r in evals],
        "curves": curves(train, evals),
        "summary": _read_json(path / SUMMARY_FILE),
        "config": _resolved_config(path) or _request(path),
        "exit_code": _exit_code(path),
        "log": log_tail(path),
        "exports": sorted(p.name for p in (path / "exports").iterdir()) if (path / "exports").is_dir() else [],
        "merged": (path / MERGED_DIR).is_dir(),
    }


def curves(train: list[dict], evals: list[dict]) -> list[dict[str, Any]]:
    """The Runs view's charts: loss always; each other one when the run logged its metrics.

    Each chart draws its keys from the train records and, as ``eval_KEY``, from the eval records.
    """
    logged = {k for r in train for k in r}
    charts = []
    for chart_id, title, keys in CURVES:
        keys = _reward_keys(logged) if keys == ("reward", "rewards/<fn>") else keys
        series = [
            {"key": key, "split": split, "points": points}
            for key in keys
            for split, rows, name in (("train", train, key), ("eval", evals, f"eval_{key}"))
            if (points := [[r["step"], r[name]] for r in rows if isinstance(r.get(name), (int, float))])
        ]
        if series or chart_id == "loss":
            charts.append({"id": chart_id, "title": title, "series": series})
    return charts


def _reward_keys(logged: set[str]) -> tuple[str, ...]:
    """GRPO's curve: its mean reward, and one per reward function (rewards/<fn>) beside it."""
    if "reward" not in logged:
        return ()
    return ("reward", *sorted(k for k in logged if k.startswith("rewards/")))


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run folder directly under runs_dir (started here or by `aift train`), newest first."""
    from aift.eval.report import is_run_dir  # what `aift report` takes for a run

    if not runs_dir.is_dir():
        return []
    rows = [
        run_summary(p)
        for p in runs_dir.iterdir()
        if p.is_dir()
        and p.name != DATASETS_DIR
        and _NAME.match(p.name)
        and (is_run_dir(p) or any((p / m).exists() for m in (REQUEST_FILE, CONFIG_FILE)))
    ]
    return sorted(rows, key=lambda r: r["modified"], reverse=True)


# ---------------------------------------------------------------- starting and stopping


def _describe(cls: type, hidden: set[str]) -> list[dict[str, Any]]:
    """A config dataclass's fields as the form shows them: name, type, default and the field's own help."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        row = {"name": f.name, "type": str(f.type), "default": default, "help": f.metadata.get("help", "")}
        if f.name in FIELD_CHOICES:
            row["choices"] = list(FIELD_CHOICES[f.name])
        rows.append(row)
    return rows


def config_fields() -> dict[str, list[dict[str, Any]]]:
    """The TrainingConfig and LoRAConfig fields the form shows."""
    training = _describe(TrainingConfig, HIDDEN_FIELDS)
    for row in training:  # the run starts as `aift train`, from the command line's defaults
        row["default"] = FRONT_DOOR_DEFAULTS.get(row["name"], row["default"])
    return {
        "training": training,
        # use_qlora and qlora_4bit follow from the adapter picked (lora / qlora).
        "lora": _describe(LoRAConfig, {"use_qlora", "task_type"}),
    }


def method_choices() -> list[dict[str, Any]]:
    """Every registered method, in the registry's order, with its own options (its config dataclass's fields)."""
    from aift.training.methods import METHODS

    return [
        {
            "name": m.name,
            "summary": m.summary,
            "task": m.task,
            "section": m.section,
            "config": m.config_cls.__name__ if m.config_cls else None,
            "fields": _describe(m.config_cls, {"method"}) if m.config_cls else [],  # method: the form's select
        }
        for m in METHODS.values()
    ]


def data_tasks() -> list[str]:
    """The `aift prepare --task` kinds of data the registered methods train on, in the registry's order."""
    from aift.training.methods import METHODS

    return list(dict.fromkeys(m.task for m in METHODS.values()))


def prepare_tasks() -> list[str]:
    """The `aift prepare --task` choices of the data page: the methods' tasks, then raw text (trained by sft)."""
    return [*data_tasks(), "pretrain"]


def build_request(
    adapter: str,
    training: dict[str, Any],
    lora: dict[str, Any] | None,
    method: str = "sft",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The YAML mapping `aift train` reads, checked by the resolution the CLI uses (unknown keys are errors).

    Args:
        adapter: lora, qlora or full.
        training: TrainingConfig values (strings from the form are typed by the resolution).
        lora: LoRAConfig values (ignored for full fine-tuning).
        method: A registered method (sft, dpo, orpo, simpo, kto).
        options: The method's own options (its config section, e.g. ``preference:`` for DPO).
    """
    from aift.training.methods import METHODS

    if adapter not in ADAPTERS:
        raise WebUIError(f"adapter must be one of {', '.join(ADAPTERS)}; got {adapter!r}")
    if method not in METHODS:
        hint = " (LoRA, QLoRA and full are the adapter)" if method in ADAPTERS else ""
        raise WebUIError(f"method must be one of {', '.join(METHODS)}; got {method!r}{hint}")
    training, options = _given(training), _given(options)
    hidden = HIDDEN_FIELDS & training.keys()
    if hidden:
        raise WebUIError(f"{', '.join(sorted(hidden))} cannot be set here (the UI sets output_dir to the run folder)")
    if not training.get("dataset_path"):
        raise WebUIError("pick a prepared dataset (dataset_path) first")
    spec = METHODS[method]
    if options and (spec.section is None or "method" in options):
        raise WebUIError(f"options {sorted(options)} are not options of method {method}")
    check_data_task(method, spec.task, Path(training["dataset_path"]))
    lora_values = None
    if adapter != "full":
        lora_values = {**_given(lora), **({"use_qlora": True} if adapter == "qlora" else {})}
    sections = {spec.section: options} if spec.section else {}  # preference=... for DPO & co
    checked = resolve_train_configs(training=training, lora=lora_values, method=method, **sections)  # ConfigError
    check_streamed(Path(training["dataset_path"]), checked.training.max_steps)
    request: dict[str, Any] = {k: getattr(checked.training, k) for k in training}
    if checked.lora is not None:
        request["lora"] = {k: getattr(checked.lora, k) for k in lora_values}
    if method != "sft":
        request["method"] = method
    if options:
        request[spec.section] = {k: getattr(getattr(checked, spec.section), k) for k in options}
    return request


def _given(values: dict[str, Any] | None) -> dict[str, Any]:
    """The values the form filled in, with field names in snake_case."""
    return {k.replace("-", "_"): v for k, v in (values or {}).items() if v not in ("", None)}


def data_task(dataset: Path) -> str | None:
    """The `aift prepare --task` a prepared folder was written by (KTO's labelled rows: preference too)."""
    try:
        info = read_json_object(dataset / PREPARE_JSON)
    except (OSError, FileFormatError):
        return None
    task = info.get("task", "sft")
    return "preference" if task == "kto" else task


# Data the token-sum objective of SFT trains on besides sft's: raw text, and mixtures of text and SFT rows.
SFT_TRAINED = ("pretrain", "mixture")


def check_data_task(method: str, task: str, dataset: Path) -> None:
    """A clear error before starting, rather than a failed run, when the data is not of the method's task."""
    found = data_task(dataset)
    if task == "sft" and found in SFT_TRAINED:
        return
    if found is not None and found != task:
        raise WebUIError(
            f"method {method} trains on {task} data (aift prepare --task {task}); {dataset.name} holds {found} data"
        )


def check_streamed(dataset: Path, max_steps: int) -> None:
    """A corpus prepared for streaming has no length: the run needs max_steps (as `aift train` says too)."""
    try:
        streamed = "streaming" in read_json_object(dataset / PREPARE_JSON)
    except (OSError, FileFormatError):
        return
    if streamed and max_steps <= 0:
        raise WebUIError(f"{dataset.name} is a streamed corpus, with no known length: set max_steps")


def start_run(runs_dir: Path, name: str, request: dict[str, Any]) -> subprocess.Popen:
    """Starts `python -m aift train` for a new run folder in its own process group; returns the process."""
    path = run_dir(runs_dir, name, must_exist=False)
    if path.exists() and any(path.iterdir()):
        raise WebUIError(f"a run named {name!r} exists already in {runs_dir}; choose another name")
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path / REQUEST_FILE, yaml.safe_dump(request, sort_keys=False, allow_unicode=True))
    command = [sys.executable, "-m", "aift", "train", str(path / REQUEST_FILE), f"output_dir={path}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (path / LOG_FILE).open("ab") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    created = psutil.Process(process.pid).create_time()
    write_text_atomic(path / PID_FILE, f"{process.pid} {created}")
    threading.Thread(target=_record_exit, args=(process, path), daemon=True).start()
    return process


def _record_exit(process: subprocess.Popen, path: Path) -> None:
    """Reaps the process (no zombie) and writes its exit code next to its pid."""
    code = process.wait()
    write_text_atomic(path / EXIT_FILE, str(130 if code == -signal.SIGINT else code))


def stop_run(path: Path) -> bool:
    """SIGINT to the run's process group: the loop finishes its step and saves a checkpoint. False if not running."""
    pid = _live_pid(path)
    if pid is None:
        return False
    (path / STOP_FILE).write_text("stop requested from the web UI\n")
    try:
        os.killpg(os.getpgid(pid), signal.SIGINT)
    except ProcessLookupError:
        return False
    return True
