"""aift.training.checkpoint on its own: save/load round trip, manifest, 'latest' skipping a damaged one."""

from __future__ import annotations

import json
import random

import pytest
import torch

from aift.training import checkpoint as ckpt


class _Model(torch.nn.Module):
    """A tiny model with the save_pretrained the checkpoint module calls."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))


def _trained():
    torch.manual_seed(0)
    model = _Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(tmp_path, step, limit=None):
    model, optimizer, scheduler = _trained()
    state = ckpt.TrainerState(step=step, epoch=1, micro_batch=3, tokens=42, last_loss=1.5)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", state, model, optimizer, scheduler, ckpt.capture_rng(), limit)
    return path, model, optimizer, scheduler


def test_save_then_load_restores_weights_optimizer_scheduler_state_and_rng(tmp_path):
    path, model, optimizer, scheduler = _save(tmp_path, 5)
    assert path.name == "checkpoint-5" and ckpt.verify_checkpoint(path) is None
    fresh = _Model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (s + 1))
    state, rng = ckpt.load_checkpoint(path, fresh, fresh_opt, fresh_sched, is_peft=False)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert (state.step, state.epoch, state.micro_batch, state.tokens, state.last_loss) == (5, 1, 3, 42, 1.5)
    ckpt.restore_rng(rng)
    first = (random.random(), torch.rand(1).item())
    ckpt.restore_rng(rng)
    assert (random.random(), torch.rand(1).item()) == first


def test_loading_full_weights_as_an_adapter_is_a_clear_error(tmp_path):
    path, *_ = _save(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match="adapter_model.safetensors"):
        ckpt.load_weights(path, _Model(), is_peft=True)


def test_manifest_lists_every_file_and_detects_changes(tmp_path):
    path, *_ = _save(tmp_path, 2)
    files = json.loads((path / ckpt.MANIFEST_FILE).read_text())["files"]
    assert set(files) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", ckpt.STATE_FILE}
    (path / "scheduler.pt").write_bytes(b"x" * files["scheduler.pt"]["size"])
    assert "sha256" in ckpt.verify_checkpoint(path)
    (path / "scheduler.pt").unlink()
    assert "missing" in ckpt.verify_checkpoint(path)
    (path / ckpt.MANIFEST_FILE).unlink()
    assert "no manifest.json" in ckpt.verify_checkpoint(path)


def test_latest_skips_a_damaged_checkpoint_and_a_named_damaged_one_is_an_error(tmp_path):
    _save(tmp_path, 1)
    newest, *_ = _save(tmp_path, 2)
    (newest / "optimizer.pt").write_bytes(b"")
    assert ckpt.find_checkpoint(tmp_path, "latest").name == "checkpoint-1"
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.find_checkpoint(tmp_path, str(newest))
    (tmp_path / "checkpoints" / "checkpoint-1" / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        ckpt.find_checkpoint(tmp_path, "latest")


def test_latest_without_checkpoints_and_rotation(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="has no checkpoint"):
        ckpt.find_checkpoint(tmp_path, "latest")
    for step in (1, 2, 3):
        _save(tmp_path, step, limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_trainer_state_json_ignores_unknown_fields():
    text = json.dumps({**json.loads(ckpt.TrainerState(step=3).to_json()), "from_the_future": 1})
    assert ckpt.TrainerState.from_json(text).step == 3
