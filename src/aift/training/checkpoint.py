"""Checkpoints that resume exactly: weights (safetensors), optimizer, scheduler, RNG states and data position.

A checkpoint is written into a hidden temp folder beside its final place and renamed, so the newest
``checkpoint-STEP`` folder is always complete. Everything is read back with safetensors or
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from aift.errors import AiftError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"  # accelerator.save_state output of FSDP / DeepSpeed runs


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
    checkpoints_dir: Path, state: TrainerState, model, optimizer, scheduler, rng: dict, total_limit: int | None
) -> Path:
    """Writes checkpoint-STEP atomically and deletes the oldest beyond total_limit; returns its path."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"{PREFIX}{state.step}"
    tmp = checkpoints_dir / f".tmp-{PREFIX}{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _finish_checkpoint(tmp, final, scheduler, rng, state, total_limit)
    return final


def _finish_checkpoint(tmp: Path, final: Path, scheduler, rng: dict, state: TrainerState, total_limit) -> None:
    """Writes what every checkpoint holds besides weights, renames the temp dir into place, rotates old ones."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng, tmp / "rng_state.pt")
    (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _rotate(final.parent, total_limit, keep=final)


def save_sharded_checkpoint(
    accelerator, checkpoints_dir: Path, state: TrainerState, scheduler, rng: dict, total_limit: int | None
) -> Path:
    """FSDP / DeepSpeed: every rank writes its shards (accelerator.save_state), rank 0 the rest; atomic rename."""
    final = checkpoints_dir / f"{PREFIX}{state.step}"
    tmp = checkpoints_dir / f".tmp-{PREFIX}{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / SHARDED_DIR))  # model and optimizer shards, collective
    if accelerator.is_main_process:
        _finish_checkpoint(tmp, final, scheduler, rng, state, total_limit)
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


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def _rotate(checkpoints_dir: Path, total_limit: int | None, keep: Path) -> None:
    if not total_limit:
        return
    old = [p for p in list_checkpoints(checkpoints_dir) if p != keep]
    for path in old[: max(0, len(old) - (total_limit - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(output_dir: Path, spec: str) -> Path:
    """A checkpoint folder from a path, or 'latest' (the newest complete one under output_dir/checkpoints)."""
    if spec == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise CheckpointError(f"resume_from_checkpoint='latest' but {output_dir / 'checkpoints'} has no checkpoint")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder (no {STATE_FILE} in it)")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, is_peft: bool) -> tuple[TrainerState, dict]:
    """Loads weights, optimizer and scheduler in place; returns the trainer state and the RNG states."""
    if is_peft:
        _load_adapter(path, model)
    else:
        _load_full_weights(path, model)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    state = TrainerState.from_json((path / STATE_FILE).read_text(encoding="utf-8"))
    return state, rng


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
