"""A run is never lost nor silently continued from garbage: verified checkpoints, one run per output dir,
SIGTERM, NaN/inf, disk full, and resuming a different run. Driven through `aift train` (in-process where
no signal or resource limit is needed), on the tiny model with the defaults on (packing, bf16, dropout)."""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from subprocess_helpers import child_env, wait_for

from aift.cli import main
from aift.training.checkpoint import MANIFEST_FILE, verify_checkpoint
from aift.training.run_guard import LOCK_FILE, OutputDirLock, OutputDirLockedError


def _args(model_dir, dataset, output_dir, *extra) -> list[str]:
    return [
        "train", "--use-lora", f"model_name={model_dir}", f"dataset_path={dataset}", f"output_dir={output_dir}",
        "batch_size=1", "gradient_accumulation_steps=2", "max_steps=6", "max_length=64", "warmup_steps=1",
        "learning_rate=1e-3", "save_steps=2", "save_total_limit=4", "logging_steps=1", "eval_steps=0",
        "report_to=none", "seed=3", *extra,
    ]  # fmt: skip


@pytest.fixture
def train(capsys, caplog):
    """train(model_dir, dataset, output_dir, *extra) -> (exit code, everything printed and logged)."""
    caplog.set_level(logging.INFO)

    def run(*args) -> tuple[int, str]:
        caplog.clear()
        code = main(_args(*args))
        captured = capsys.readouterr()
        return code, captured.out + captured.err + caplog.text

    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, prepared_small) -> Path:
    """A finished 6-step LoRA run with checkpoint-2, -4 and -6."""
    out = tmp_path_factory.mktemp("reliab") / "run"
    assert main(_args(tiny_model_dir, prepared_small, out)) == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"checkpoint-{step}"


def _error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("aift train: error:")]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- manifests


def test_every_checkpoint_has_a_manifest_of_its_files(trained_run):
    for step in (2, 4, 6):
        folder = _checkpoint(trained_run, step)
        listed = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != MANIFEST_FILE}
        assert set(listed) == on_disk and "adapter_model.safetensors" in listed
        assert all(listed[name]["size"] == (folder / name).stat().st_size for name in listed)
        assert verify_checkpoint(folder) is None


def test_resume_latest_falls_back_past_damaged_checkpoints(run_copy, tiny_model_dir, prepared_small, train):
    (_checkpoint(run_copy, 6) / MANIFEST_FILE).unlink()  # as if killed before it was finished
    _flip_a_byte(_checkpoint(run_copy, 4) / "optimizer.pt")
    code, out = train(tiny_model_dir, prepared_small, run_copy, "resume_from_checkpoint=latest")
    assert code == 0, out
    assert "checkpoint-6 is corrupt: no manifest.json" in out
    assert "checkpoint-4 is corrupt: optimizer.pt does not match its sha256 checksum" in out
    assert re.search(r"resumed from \S+checkpoint-2 at step 2", out)
    assert "Traceback" not in out
    assert json.loads((run_copy / "train_summary.json").read_text())["steps"] == 6


def test_a_named_damaged_checkpoint_is_an_error(run_copy, tiny_model_dir, prepared_small, train):
    weights = _checkpoint(run_copy, 4) / "adapter_model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)  # half-written
    code, out = train(tiny_model_dir, prepared_small, run_copy, f"resume_from_checkpoint={weights.parent}")
    assert code == 2
    assert (
        f"aift train: error: checkpoint-4 is corrupt: adapter_model.safetensors has {size // 2} bytes, "
        f"the manifest says {size}" in out
    )
    assert "Traceback" not in out


def test_resuming_a_different_run_lists_the_differences(run_copy, tiny_model_dir, prepared_small, train):
    code, out = train(
        tiny_model_dir, prepared_small, run_copy, "resume_from_checkpoint=latest", "batch_size=2", "lora.r=8"
    )
    assert code == 2
    error = _error_line(out)
    assert "batch_size: 1 -> 2" in error and "lora.r: 16 -> 8" in error and "--resume-force" in error
    assert "max_length" not in error and "dataset" not in error  # only what changed

    code, out = train(
        tiny_model_dir, prepared_small, run_copy, "resume_from_checkpoint=latest", "max_steps=7",
        "gradient_accumulation_steps=1", "--resume-force",
    )  # fmt: skip
    assert code == 0, out
    assert "resume_force" in out and "gradient_accumulation_steps x world_size: 2 -> 1" in out
    state = json.loads((_checkpoint(run_copy, 7) / "trainer_state.json").read_text())
    assert state["run"]["gradient_accumulation_steps x world_size"] == 1  # what the next resume checks


# ---------------------------------------------------------------------- NaN / inf


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_model_dir, prepared_small, tokenizer) -> tuple[Path, int]:
    """The tiny model with an inf in the embedding of a token that only one train example holds (early on),
    and that example's index: a model a user could have, whose loss is NaN on that one example. The example
    is one of step 3's (batch plan of seed 3), so that the runs stop or skip early."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from aift.training.batching import BatchPlanner, to_examples
    from aift.training.run_guard import example_ids

    data = load_from_disk(str(prepared_small))
    examples = to_examples(str(prepared_small), tokenizer, 64, "training")
    plan = BatchPlanner(examples, 1, 64, True, tokenizer.pad_token_id, seed=3).epoch(0)
    step_3 = example_ids(plan[4:6])  # 2 micro-batches of 1 packed row per step
    seen_in_test = {t for row in data["test"]["input_ids"] for t in row}
    train_rows = [row["input_ids"] for row in examples.rows]
    holders: dict[int, set[int]] = {}
    for index, row in enumerate(train_rows):
        for token in row:
            holders.setdefault(token, set()).add(index)
    token, index = next(
        (t, i)
        for t, ids in holders.items()
        for i in ids
        if len(ids) == 1 and i in step_3 and t not in seen_in_test and train_rows[i].index(t) < 20
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False  # else the inf would be in every logit too
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    path = tmp_path_factory.mktemp("poisoned")
    model.save_pretrained(path)
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(tiny_model_dir / name, path / name)
    return path, index


def test_a_nan_loss_stops_the_run_naming_step_examples_and_checkpoint(poisoned, prepared_small, tmp_path, train):
    model_dir, bad = poisoned
    out_dir = tmp_path / "nan"
    code, out = train(model_dir, prepared_small, out_dir, "max_steps=-1", "num_epochs=1")
    assert code == 2, out
    error = _error_line(out)
    assert "error: step 3: non-finite loss nan" in error
    examples = json.loads(re.search(r"on train examples (\[[\d, ]+\])", error).group(1))
    assert bad in examples
    assert f"the last good checkpoint is {_checkpoint(out_dir, 2)}" in error
    assert [p.name for p in (out_dir / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (out_dir / "final").exists() and not (out_dir / ".tmp-final").exists()
    assert not (out_dir / "train_summary.json").exists()
    assert not (out_dir / LOCK_FILE).exists()  # released on the error too
    assert "Traceback" not in out


def test_skip_nonfinite_steps_skips_and_counts_them(poisoned, prepared_small, tmp_path, train, read_metrics):
    model_dir, bad = poisoned
    out_dir = tmp_path / "skip"
    code, out = train(model_dir, prepared_small, out_dir, "max_steps=4", "skip_nonfinite_steps=2")
    assert code == 0, out
    (skipped,) = read_metrics(out_dir, "skipped_step")
    assert skipped["step"] == 3 and skipped["loss"] == "nan" and bad in skipped["examples"]
    summary = json.loads((out_dir / "train_summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 1 and summary["steps"] == 4
    assert read_metrics(out_dir)[-1]["skipped_nonfinite_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in read_metrics(out_dir))  # no NaN in the train records
    from safetensors.torch import load_file

    weights = load_file(out_dir / "final" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_weights_are_never_saved(tiny_model_dir, prepared_small, tmp_path, train):
    out_dir = tmp_path / "huge-lr"
    # The loss of step 1 is fine; its update, at this learning rate, leaves inf in the adapters.
    code, out = train(tiny_model_dir, prepared_small, out_dir, "max_steps=1", "warmup_steps=0", "learning_rate=1e39")
    assert code == 2, out
    assert "after step 1 the weights hold NaN or inf" in out and "no checkpoint was saved before it" in out
    assert not (out_dir / "final").exists() and not list((out_dir / "checkpoints").glob("*"))


# ---------------------------------------------------------------------- one run per output dir


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_stale_lock_is_taken_over_with_a_note(tiny_model_dir, prepared_small, tmp_path, train):
    out_dir = tmp_path / "stale"
    out_dir.mkdir()
    (out_dir / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    (out_dir / ".tmp-final").mkdir()  # the dead run was killed while saving its final model
    code, out = train(tiny_model_dir, prepared_small, out_dir, "max_steps=1")
    assert code == 0, out
    assert f"taking over the stale lock of {out_dir}" in out and "removing" in out
    assert not (out_dir / LOCK_FILE).exists() and (out_dir / "final").is_dir()


def test_a_lock_from_another_host_holds_unless_forced(tmp_path, train):
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    code, out = train("unused-model", "unused-data", tmp_path)
    assert code == 2 and "in use by another aift run (pid 1 on host elsewhere" in out and "--force-unlock" in out
    with OutputDirLock(tmp_path, force=True):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()} on host"):
            OutputDirLock(tmp_path).acquire()  # this process is alive
    assert not lock.exists()


@pytest.mark.slow
def test_a_live_run_locks_its_dir_and_sigterm_saves_a_checkpoint(tiny_model_dir, prepared_small, tmp_path, train):
    out_dir = tmp_path / "live"
    command = [sys.executable, "-m", "aift", *_args(tiny_model_dir, prepared_small, out_dir, "save_steps=0")]
    command += ["max_steps=500", "--no-tcmalloc"]
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(out_dir / "metrics.jsonl", proc)
        code, out = train(tiny_model_dir, prepared_small, out_dir, "overwrite_output_dir=true")
        assert code == 2 and f"in use by another aift run (pid {proc.pid} on host {socket.gethostname()}" in out
        assert (out_dir / "metrics.jsonl").exists()  # overwrite_output_dir did not touch the live run
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-2000:]
    assert "aift train: stopped by SIGTERM after saving a checkpoint" in output and "Traceback" not in output
    (checkpoint,) = (out_dir / "checkpoints").glob("checkpoint-*")
    assert verify_checkpoint(checkpoint) is None
    assert not (out_dir / "train_summary.json").exists() and not (out_dir / LOCK_FILE).exists()


# ---------------------------------------------------------------------- disk full


def _train_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """`aift train` where no file may grow beyond ``limit`` bytes: writes fail as on a full disk (EFBIG)."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "aift", *_args(*args), "--no-tcmalloc"]
    return subprocess.run(command, env=child_env(), capture_output=True, text=True, preexec_fn=limit_file_size)


def _leftovers(run: Path) -> list[str]:
    return [p.name for p in run.rglob(".tmp*")]


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(run_copy, tiny_model_dir, prepared_small):
    biggest = max(p.stat().st_size for p in _checkpoint(run_copy, 6).iterdir())
    done = _train_with_file_size_limit(
        biggest // 2, tiny_model_dir, prepared_small, run_copy, "resume_from_checkpoint=latest", "max_steps=7"
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"aift train: error: could not write {_checkpoint(run_copy, 7)} (disk full or not writable?)" in done.stderr
    assert f"the previous checkpoint {_checkpoint(run_copy, 6)} is intact" in done.stderr
    assert "Traceback" not in done.stderr
    assert not _checkpoint(run_copy, 7).exists() and not _leftovers(run_copy)
    assert verify_checkpoint(_checkpoint(run_copy, 6)) is None


@pytest.mark.slow
def test_disk_full_during_the_final_save_leaves_no_half_written_folder(
    tiny_model_dir, prepared_small, tmp_path, trained_run
):
    biggest_checkpoint_file = max(p.stat().st_size for p in _checkpoint(trained_run, 6).iterdir())
    biggest_final_file = max(p.stat().st_size for p in (trained_run / "final").iterdir())
    assert biggest_final_file > 2 * biggest_checkpoint_file  # the tokenizer
    out_dir = tmp_path / "final-full"
    limit = 2 * biggest_checkpoint_file
    done = _train_with_file_size_limit(limit, tiny_model_dir, prepared_small, out_dir, "max_steps=2")
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"aift train: error: could not write {out_dir / 'final'} (disk full or not writable?)" in done.stderr
    assert f"the newest checkpoint {_checkpoint(out_dir, 2)} is intact" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (out_dir / "final").exists() and not _leftovers(out_dir)
    assert verify_checkpoint(_checkpoint(out_dir, 2)) is None
    assert not (out_dir / "train_summary.json").exists() and not (out_dir / LOCK_FILE).exists()
