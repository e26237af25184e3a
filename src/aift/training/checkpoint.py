"""Checkpoints that resume exactly: weights (safetensors), optimizer, scheduler, RNG states and data position.

A checkpoint is written into a hidden temp folder beside its final place and renamed, so the newest
``checkpoint-STEP`` folder is always complete; a write that fails (disk full, not writable) removes the
temp folder and leaves the previous checkpoints as they were. The last file written is ``manifest.json``
(size and sha256 of every other file): resuming verifies it, and 'latest' falls back past a damaged
checkpoint to the newest intact one. Each checkpoint also records what defines the run (model, data,
method, LoRA shape, batch geometry); resuming with other values is an error unless ``resume_force``.
Everything is read back with safetensors or ``torch.load(weights_only=True)``: no pickled code is executed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aift.errors import AiftError
from aift.models.run_folder import CHECKPOINTS_DIR
from aift.utils.files import read_json_object, write_json_atomic

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
SHARDED_DIR = "sharded"  # accelerator.save_state output of FSDP / DeepSpeed runs
OBJECTIVE_STATE_FILE = "objective_state.pt"  # an objective's own state (GRPO's rollout of the iteration cycle)

log = logging.getLogger(__name__)


class CheckpointError(AiftError, RuntimeError):
    """A checkpoint cannot be found or read."""


@dataclass
class TrainerState:
    """Where training stands: optimizer steps done and the position in the data."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0  # index into the epoch's plan of the next micro-batch to train on
    seed: int = 42
    total_steps: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on so far
    train_time_s: float = 0.0  # seconds spent in training steps (not eval or saving)
    last_loss: float | None = None
    initial_eval_loss: float | None = None  # eval loss before the first step (kept for the summary)
    skipped_nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient (skip_nonfinite_steps)
    run: dict[str, Any] | None = None  # what defines the run (run_identity), compared on resume

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def capture_rng() -> dict:
    """Every RNG that training draws from (Python, NumPy, torch CPU and each CUDA device)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoints_dir: Path,
    state: TrainerState,
    model,
    optimizer,
    scheduler,
    rng: dict,
    total_limit: int | None,
    extra: dict | None = None,
) -> Path:
    """Writes checkpoint-STEP atomically and deletes the oldest beyond total_limit; returns its path."""
    final = checkpoints_dir / f"{PREFIX}{state.step}"
    tmp = checkpoints_dir / f".tmp-{PREFIX}{state.step}"
    with writing_folder(tmp, final):
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        finish_checkpoint(tmp, final, scheduler, rng, state, total_limit, extra)
    return final


def finish_checkpoint(
    tmp: Path, final: Path, scheduler, rng: dict, state: TrainerState, total_limit, extra: dict | None = None
) -> None:
    """Writes what every checkpoint holds besides weights (and ``extra``: file name -> object to torch.save), the
    manifest last, renames the temp dir into place and rotates old ones."""
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng, tmp / "rng_state.pt")
    (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _rotate(final.parent, total_limit, keep=final)


@contextlib.contextmanager
def writing_folder(tmp: Path, final: Path, fresh: bool = True) -> Iterator[None]:
    """Around writing ``tmp`` (renamed to ``final`` inside): a fresh temp folder (unless ``fresh`` is False);
    when anything fails, no temp folder is left behind, and a failed write (disk full, not writable) becomes
    a CheckpointError saying what is still intact."""
    try:
        if fresh:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        yield
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(e):
            raise
        is_checkpoint = final.name.startswith(PREFIX)
        found = list_checkpoints(final.parent if is_checkpoint else final.parent / CHECKPOINTS_DIR)
        newest = "the previous checkpoint" if is_checkpoint else "the newest checkpoint"
        kept = f"{newest} {found[-1]} is intact" if found else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write {final} (disk full or not writable?): {_first_line(e)}; nothing half-written was "
            f"left behind and {kept}"
        ) from e


def _is_write_failure(error: Exception) -> bool:
    # Writers report a failed write in their own way: OSError (Python), RuntimeError (torch.save's zip writer),
    # SafetensorError, or a bare Exception "... (os error 28)" (tokenizers, from Rust).
    from safetensors import SafetensorError

    return isinstance(error, (OSError, RuntimeError, SafetensorError)) or bool(re.search(r"os error \d+", str(error)))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def save_sharded_checkpoint(
    accelerator,
    checkpoints_dir: Path,
    state: TrainerState,
    scheduler,
    rng: dict,
    total_limit: int | None,
    extra: dict | None = None,
) -> Path:
    """FSDP / DeepSpeed: every rank writes its shards (accelerator.save_state), rank 0 the rest; atomic rename."""
    final = checkpoints_dir / f"{PREFIX}{state.step}"
    tmp = checkpoints_dir / f".tmp-{PREFIX}{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / SHARDED_DIR))  # model and optimizer shards, collective
    accelerator.wait_for_everyone()  # every shard is written before rank 0 lists them in the manifest
    if accelerator.is_main_process:
        with writing_folder(tmp, final, fresh=False):
            finish_checkpoint(tmp, final, scheduler, rng, state, total_limit, extra)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(path: Path, accelerator, scheduler) -> tuple[TrainerState, dict]:
    """Counterpart of save_sharded_checkpoint (same number of processes and the same strategy)."""
    if not (path / SHARDED_DIR).is_dir():
        raise CheckpointError(f"{path} was not written by an FSDP/DeepSpeed run (no {SHARDED_DIR}/ in it)")
    accelerator.load_state(str(path / SHARDED_DIR))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    return TrainerState.from_json((path / STATE_FILE).read_text(encoding="utf-8")), rng


def save_objective_states(states: list) -> dict:
    """The ``extra`` files of a checkpoint for an objective's state, one entry per data-parallel process."""
    return {OBJECTIVE_STATE_FILE: {"format": 1, "processes": states}}


def load_objective_state(path: Path, rank: int, world: int) -> Any:
    """This process's objective state from checkpoint ``path``; CheckpointError when it cannot be restored."""
    file = path / OBJECTIVE_STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} holds no {OBJECTIVE_STATE_FILE}: it was written by another method")
    states = torch.load(file, weights_only=True)["processes"]
    if len(states) != world:
        raise CheckpointError(
            f"{path} holds the objective state of {len(states)} process(es); resume on that many, not {world}"
        )
    return states[rank]


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (their manifest written), oldest first."""
    return [p for p in _checkpoint_folders(checkpoints_dir) if (p / MANIFEST_FILE).is_file()]


def _rotate(checkpoints_dir: Path, total_limit: int | None, keep: Path) -> None:
    if not total_limit:
        return
    old = [p for p in list_checkpoints(checkpoints_dir) if p != keep]
    for path in old[: max(0, len(old) - (total_limit - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(output_dir: Path, spec: str) -> Path:
    """The checkpoint to resume from, verified against its manifest: a path (a damaged one is an error), or
    'latest': the newest intact one under output_dir/checkpoints, each damaged newer one reported by name."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint folder (it does not exist)")
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"{path.name} is corrupt: {problem} ({path}); resume from another checkpoint")
        return path
    candidates = _checkpoint_folders(output_dir / CHECKPOINTS_DIR)
    if not candidates:
        raise CheckpointError(f"resume_from_checkpoint='latest' but {output_dir / CHECKPOINTS_DIR} has no checkpoint")
    damaged = []
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if not problem:
            return path
        log.warning("%s is corrupt: %s; trying the previous checkpoint", path.name, problem)
        damaged.append(f"{path.name} is corrupt: {problem}")
    raise CheckpointError(f"no intact checkpoint in {output_dir / CHECKPOINTS_DIR}: " + "; ".join(damaged))


def _checkpoint_folders(checkpoints_dir: Path) -> list[Path]:
    """Every checkpoint-STEP folder, complete or not, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


# ---------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every file of the folder; written last, so its presence means done."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {
        "format": 1,
        "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    write_json_atomic(folder / MANIFEST_FILE, manifest, indent=1)


def verify_checkpoint(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (missing manifest, missing or changed file), or None if intact."""
    try:
        files = read_json_object(folder / MANIFEST_FILE, "checkpoint manifest")["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (it was not finished writing, or predates manifests)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST_FILE} ({e})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 checksum"
    return None


# ---------------------------------------------------------------------- the same run


def run_identity(config, info, world_size: int, rows: list[dict]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint for the resume to be exact."""
    lora = info.lora_config
    return {
        "model": info.model_name,
        "method": info.method,
        "dataset": dataset_fingerprint(rows),
        "lora": None
        if lora is None
        else {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "target_modules": lora.target_modules,
            "use_dora": lora.use_dora,
            "use_rslora": lora.use_rslora,
            **({"modules_to_save": lora.modules_to_save} if lora.modules_to_save else {}),
        },
        "batch_size": config.batch_size,
        # Micro-batches are split over processes one by one: 2 processes x 1 equal 1 process x 2 exactly.
        "gradient_accumulation_steps x world_size": config.gradient_accumulation_steps * world_size,
        "max_length": config.max_length,
        "packing": config.packing,
        "optimizer": config.optimizer,  # another optimizer's state would not fit (or silently mean else)
    }


# What a checkpoint's recorded run means by a key it lacks (written before aift recorded it).
RECORDED_BEFORE = {"optimizer": "adamw"}


def dataset_fingerprint(rows: list[dict]) -> dict[str, Any]:
    """Number of training rows and a sha256 of their token ids and labels (the data as trained, any source).

    Every token field counts, by name: input_ids/labels for SFT, chosen_*/rejected_* for preference pairs.
    """
    digest = hashlib.sha256()
    for row in rows:
        for name in sorted(k for k in row if k.endswith(("input_ids", "labels"))):
            digest.update(name.encode() + b"=")
            digest.update(array("q", row[name]).tobytes())
            digest.update(b"|")
        digest.update(b"\n")
    return {"rows": len(rows), "sha256": digest.hexdigest()[:16]}


def check_same_run(path: Path, identity: dict[str, Any], force: bool) -> None:
    """Raises CheckpointError listing what differs from the run that wrote ``path`` (a warning with ``force``)."""
    state = read_json_object(path / STATE_FILE, "trainer state")
    recorded = state.get("run")
    if recorded is None:
        log.warning("note: %s does not record its run's settings; they cannot be compared", path)
        return
    recorded = {**RECORDED_BEFORE, **recorded}
    changes = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in _differences(recorded, identity).items()]
    if not changes:
        return
    if force:
        log.warning("resume_force: resuming %s although the run differs: %s", path, "; ".join(changes))
        return
    raise CheckpointError(
        f"{path} was written by a different run ({'; '.join(changes)}); resume with the same settings, or pass "
        "--resume-force (resume_force=true) to continue anyway (the result is then not an exact resume)"
    )


def _differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def load_checkpoint(path: Path, model, optimizer, scheduler, is_peft: bool) -> tuple[TrainerState, dict]:
    """Loads weights, optimizer and scheduler in place; returns the trainer state and the RNG states."""
    load_weights(path, model, is_peft)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    state = TrainerState.from_json((path / STATE_FILE).read_text(encoding="utf-8"))
    return state, rng


def load_weights(path: Path, model, is_peft: bool) -> None:
    """Loads a checkpoint's adapter (LoRA/QLoRA) or full weights into ``model`` in place."""
    if is_peft:
        _load_adapter(path, model)
    else:
        _load_full_weights(path, model)


def _load_adapter(path: Path, model) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} holds no adapter_model.safetensors: was it written by a full fine-tune?")
    result = set_peft_model_state_dict(model, load_file(weights))
    if result.unexpected_keys:
        raise CheckpointError(f"{weights} does not match this adapter: unexpected {result.unexpected_keys[:3]}")


def _load_full_weights(path: Path, model) -> None:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files or (path / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{path} holds no full model weights: was it written by a LoRA run?")
    loaded: set[str] = set()
    for file in files:
        weights = load_file(file)
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"{file} does not match this model: unexpected {result.unexpected_keys[:3]}")
        loaded |= set(weights)
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in loaded}
    # Tied weights (lm_head = embeddings) are saved once; they are restored through the tensor they share.
    missing = [k for k in own if k not in loaded and own[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise CheckpointError(f"{path} lacks weights for {missing[:3]}")
