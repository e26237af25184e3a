"""What keeps a run from being lost or silently wrong: one run per output dir, a checkpoint on SIGTERM, and a
stop (or a counted skip) on a NaN/inf loss or gradient.

- :class:`OutputDirLock`: ``<output_dir>/.aift.lock`` names the pid and host of the run that owns the dir; a
  second run into it fails at once; the lock of a dead process on this host is taken over with a note.
- :class:`StopOnSignal`: Ctrl-C (SIGINT) or SIGTERM (what Slurm and Kubernetes send) asks the loop to
  finish its step and save a checkpoint; the CLI then exits with 128 + the signal number.
- :func:`skip_nonfinite_step` and :func:`check_finite_weights`: the loop never steps on, nor saves, NaN/inf.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import torch

from aift.errors import AiftError
from aift.utils.files import FileFormatError, read_json_object

log = logging.getLogger(__name__)

LOCK_FILE = ".aift.lock"


class OutputDirLockedError(AiftError, RuntimeError):
    """Another run, alive (or on another host), owns the output dir."""


class NonFiniteError(AiftError, FloatingPointError):
    """The loss, a gradient or the weights became NaN or inf."""


# ---------------------------------------------------------------------- one run per output dir


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 counted from the command, which may hold spaces


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class OutputDirLock:
    """``with OutputDirLock(output_dir):`` holds the output dir for this run (a no-op when ``enabled`` is False).

    The lock file is created complete and atomically (a hard link of a written temp file), so a reader never
    sees half of it. A lock whose process is gone (same host, pid dead or reused) is stale and taken over; a
    lock from another host cannot be checked from here and counts as alive unless ``force`` is set.
    """

    def __init__(self, output_dir: str | Path, force: bool = False, enabled: bool = True) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.force, self.enabled = force, enabled
        self.holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "process_start": _process_start(os.getpid()),
        }
        self._held = False

    def __enter__(self) -> OutputDirLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover can race with another process's: try again, then give up
            if self._create():
                self._held = True
                _remove_leftovers(self.path.parent)
                return
            other = self._read()
            if other is not None and self._alive(other):
                raise OutputDirLockedError(self._in_use_message(other))
            self._take_over(other)
        raise OutputDirLockedError(f"{self.path.parent}: could not take {self.path} (another run keeps taking it)")

    def release(self) -> None:
        if self._held and self._read() == self.holder:  # never remove a lock another run took over
            self.path.unlink(missing_ok=True)
        self._held = False

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.holder), encoding="utf-8")
        try:
            os.link(tmp, self.path)  # fails if the lock exists: the check and the creation are one step
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create, then the content
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.holder))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            return read_json_object(self.path)
        except (OSError, FileFormatError):  # gone, or caught between create and write: no holder to name
            return None

    def _alive(self, other: dict) -> bool:
        if other.get("host") != self.holder["host"]:
            return not self.force
        pid = other.get("pid")
        return isinstance(pid, int) and _pid_alive(pid, other.get("process_start"))

    def _in_use_message(self, other: dict) -> str:
        who = f"pid {other.get('pid')} on host {other.get('host')}, started {other.get('started')}"
        message = (
            f"{self.path.parent} is in use by another aift run ({who}): wait for it to end, or choose another "
            "output_dir (overwrite_output_dir does not apply to a running run)"
        )
        if other.get("host") != self.holder["host"]:
            message += f"; if that run is dead, pass --force-unlock (force_unlock=true) or delete {self.path}"
        return message

    def _take_over(self, other: dict | None) -> None:
        if other is None:
            log.warning("note: %s is unreadable; taking it over", self.path)
        else:
            log.warning(
                "note: taking over the stale lock of %s (pid %s on host %s is no longer running)",
                self.path.parent,
                other.get("pid"),
                other.get("host"),
            )
        self.path.unlink(missing_ok=True)


def output_dir_lock(config) -> OutputDirLock:
    """The lock of a run's output dir, taken before anything is loaded; under a launcher by rank 0 only."""
    return OutputDirLock(config.output_dir, force=config.force_unlock, enabled=os.environ.get("RANK", "0") == "0")


def _remove_leftovers(output_dir: Path) -> None:
    """Temp folders of a run killed while saving: no other run writes here now, so they can only be stale."""
    for tmp in [*output_dir.glob("checkpoints/.tmp-*"), *output_dir.glob(".tmp-final")]:
        log.warning("note: removing %s, left half-written by a run that was killed while saving", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- SIGINT / SIGTERM


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; the CLI exits with 128 + ``signum``."""

    def __init__(self, signum: int, saved: bool) -> None:
        what = "after saving a checkpoint" if saved else "at once (a second signal: no checkpoint)"
        super().__init__(f"stopped by {signal.Signals(signum).name} {what}")
        self.signum = signum


class StopOnSignal:
    """The first Ctrl-C or SIGTERM asks the loop to finish its step and save a checkpoint; a second one stops
    at once. Signal handlers exist in the main thread only: elsewhere (a notebook's worker) this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise Interrupted(signum, saved=False)
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: finishing this step and saving a checkpoint (again to stop at once)", name)

    def should_stop(self, accelerator) -> bool:
        """Whether any process got a signal: all must stop at the same step (saving is collective)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item())

    def interrupted(self) -> Interrupted:
        """What the loop raises once it saved the checkpoint the signal asked for."""
        return Interrupted(self.signum, saved=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


# ---------------------------------------------------------------------- NaN / inf


def example_ids(window: list) -> list[int]:
    """Indices (into the train split) of the examples of a step's micro-batches, padded or packed."""
    ids: set[int] = set()
    for micro_batch in window:
        for item in micro_batch:
            ids.update(item if isinstance(item, (list, tuple)) else [item])
    return sorted(ids)


def is_finite_step(loss: float, grad_norm, check_grads: bool) -> bool:
    """The step's loss, and its gradient norm unless a loss scaler (fp16) handles inf gradients itself."""
    return math.isfinite(loss) and (not check_grads or grad_norm is None or math.isfinite(float(grad_norm)))


def skip_nonfinite_step(
    state, budget: int, loss: float, grad_norm, window: list, checkpoints_dir: Path, can_skip: bool = True
) -> dict:
    """Counts a skipped step in ``state`` and returns its metrics record; raises NonFiniteError when
    ``budget`` skips are spent (or skipping is impossible), naming the step, the examples and the checkpoint.
    """
    step, ids = state.step + 1, example_ids(window)
    what = f"loss {loss}, grad norm {grad_norm if grad_norm is None else float(grad_norm)}"
    if not can_skip or state.skipped_nonfinite_steps >= budget:
        raise NonFiniteError(
            f"step {step}: non-finite {what} on train examples {_shorten(ids)} (row indices of the train split); "
            f"{last_good_checkpoint(checkpoints_dir)}; no final model was written. Lower learning_rate, check "
            "these examples (`aift preview`), or set skip_nonfinite_steps=N to skip up to N such steps"
            + (f" (all {budget} allowed skips are spent)" if budget and can_skip else "")
        )
    state.skipped_nonfinite_steps += 1
    log.warning(
        "step %d: non-finite %s on train examples %s: skipped (%d of %d allowed)",
        step,
        what,
        _shorten(ids),
        state.skipped_nonfinite_steps,
        budget,
    )
    return {
        "type": "skipped_step",
        "step": step,
        "loss": str(loss),  # a string: JSON has no NaN
        "grad_norm": str(grad_norm if grad_norm is None else float(grad_norm)),
        "examples": ids,
        "skipped_nonfinite_steps": state.skipped_nonfinite_steps,
    }


def check_finite_weights(model: torch.nn.Module, accelerator, step: int, checkpoints_dir: Path) -> None:
    """Raises NonFiniteError, on every process, when a trainable weight holds NaN or inf (before any save)."""
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    count = torch.tensor([float(len(bad))], device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, "sum")
    if count.item():
        names = ", ".join(bad[:3]) or "on another process"
        raise NonFiniteError(
            f"after step {step} the weights hold NaN or inf ({names}): not saving them; "
            f"{last_good_checkpoint(checkpoints_dir)}. Lower learning_rate"
        )


def last_good_checkpoint(checkpoints_dir: Path) -> str:
    from aift.training.checkpoint import list_checkpoints

    found = list_checkpoints(checkpoints_dir)
    if not found:
        return "no checkpoint was saved before it"
    return f"the last good checkpoint is {found[-1]} (resume_from_checkpoint=latest continues from it)"


def _shorten(ids: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"
