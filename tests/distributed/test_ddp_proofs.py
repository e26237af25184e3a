"""Real processes over gloo on loopback: DDP computes what one process computes.

Each run is `aift train` in a subprocess (the launcher starts torchrun itself), 4 steps of the 2-layer model
in fp32. The dataset packs into 7 micro-batches of 2 rows, so the 4th step of a 2-process run has one real
micro-batch and one padding micro-batch: equal losses there show that no example is counted twice per epoch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import RUN_TIMEOUT_S, clean_env, run_aift, run_with_timeout, train_args, train_losses
from optional_pieces import import_optional

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


def _train(model_dir: Path, data: Path, out: Path, *extra: str, **overrides) -> Path:
    result = run_aift(["train", *train_args(model_dir, data, out, **overrides), *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) < TOLERANCE, f"step {step}: {a[step]} vs {b[step]}"


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_model_dir, tiny_prepared):
    """Full fine-tuning: 2 processes x batch 2, and 1 process x batch 2 x 2 accumulation steps.

    The 2-process run uses the fused cross-entropy (through DDP's forward, tied lm_head trained), the
    1-process run the model's plain loss: equal losses prove both.
    """
    root = tmp_path_factory.mktemp("ddp-full")
    two = _train(tiny_model_dir, tiny_prepared, root / "two", "--nproc-per-node=2", "loss_chunk_size=16")
    one = _train(tiny_model_dir, tiny_prepared, root / "one", **{"gradient-accumulation-steps": 2})
    return two, one


def test_ddp_full_equals_one_process_with_accumulation(full_runs):
    two, one = full_runs
    a, b = train_losses(two), train_losses(one)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    _assert_same_losses(a, b, [1, 2, 3, 4])
    assert a[4] < a[1]  # it learns


def test_only_rank_0_writes(full_runs):
    two, _ = full_runs
    train_losses(two)  # raises if a step was logged twice (two writers)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (two / "final" / "model.safetensors").is_file()
    assert not list(two.rglob(".tmp*")), "a temp file or folder was left behind"
    summary = (two / "train_summary.json").read_text()
    assert '"completed": true' in summary and '"steps": 4' in summary
    assert (two / "launch-node0.yaml").is_file()


def _resume_copy(source: Path, target: Path) -> Path:
    """The run as it was after step 2: checkpoint-2 is the latest, no final model."""
    shutil.copytree(source, target)
    for name in ("checkpoints/checkpoint-4", "final"):
        shutil.rmtree(target / name)
    (target / "train_summary.json").unlink()
    return target


def test_two_process_checkpoint_resumes_in_one_process(full_runs, tiny_model_dir, tiny_prepared, tmp_path):
    two, _ = full_runs
    out = _resume_copy(two, tmp_path / "resumed")
    _train(
        tiny_model_dir,
        tiny_prepared,
        out,
        **{"gradient-accumulation-steps": 2, "resume-from-checkpoint": "latest"},
    )
    _assert_same_losses(train_losses(out), train_losses(two), [3, 4])


def test_one_process_checkpoint_resumes_in_two_processes(full_runs, tiny_model_dir, tiny_prepared, tmp_path):
    _, one = full_runs
    out = _resume_copy(one, tmp_path / "resumed")
    _train(tiny_model_dir, tiny_prepared, out, "--nproc-per-node=2", **{"resume-from-checkpoint": "latest"})
    _assert_same_losses(train_losses(out), train_losses(one), [3, 4])


def test_ddp_lora_equals_one_process_with_accumulation(tmp_path, tiny_model_dir, tiny_prepared):
    lora = {"use-lora": True, "lora-r": 4, "lora-alpha": 8, "lora-dropout": 0.0, "learning-rate": 1e-2}
    two = _train(tiny_model_dir, tiny_prepared, tmp_path / "two", "--nproc-per-node=2", **lora, **{"save-steps": 0})
    one = _train(
        tiny_model_dir, tiny_prepared, tmp_path / "one", **lora, **{"save-steps": 0, "gradient-accumulation-steps": 2}
    )
    a, b = train_losses(two), train_losses(one)
    _assert_same_losses(a, b, [1, 2, 3, 4])
    assert a[4] < a[1]
    assert (two / "final" / "adapter_model.safetensors").is_file()


def test_two_nodes_on_loopback_train_together(full_runs, tiny_model_dir, tiny_prepared, tmp_path):
    """--nnodes 2, node ranks 0 and 1, one process each: the same losses as 2 processes on one node."""
    from aift.distributed.launch import find_free_port

    two, _ = full_runs
    port, out = find_free_port(), tmp_path / "nodes"
    base = [*train_args(tiny_model_dir, tiny_prepared, out, **{"save-steps": 0}), "--nproc-per-node=1", "--nnodes=2"]
    common = [*base, "--master-addr=127.0.0.1", f"--master-port={port}", "--rdzv-timeout=120"]
    env = clean_env()
    node0 = subprocess.Popen(
        [sys.executable, "-m", "aift", "train", *common, "--node-rank=0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        node1 = run_aift(["train", *common, "--node-rank=1"])
        _, err0 = node0.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if node0.poll() is None:
            os.killpg(node0.pid, 9)
    assert node0.returncode == 0, err0[-4000:]
    assert node1.returncode == 0, node1.stderr[-4000:]
    _assert_same_losses(train_losses(out), train_losses(two), [1, 2, 3, 4])
    assert (out / "launch-node0.yaml").is_file() and (out / "launch-node1.yaml").is_file()


def test_deepspeed_zero2_one_process_on_cpu_matches_and_resumes(full_runs, tiny_model_dir, tiny_prepared, tmp_path):
    """DeepSpeed runs on this CPU in one process (Accelerate miscounts several): ZeRO-2 through the same loop gives
    the plain loop's losses, writes a sharded checkpoint, and resumes from it exactly."""
    import_optional("deepspeed", "DeepSpeed is not installed (make test installs it)")
    _, one = full_runs
    ds = ["--nproc-per-node=1", "--strategy=deepspeed", "--deepspeed=zero2"]
    out = _train(tiny_model_dir, tiny_prepared, tmp_path / "ds", *ds, **{"gradient-accumulation-steps": 2})
    _assert_same_losses(train_losses(out), train_losses(one), [1, 2, 3, 4])
    assert (out / "checkpoints" / "checkpoint-2" / "sharded" / "pytorch_model").is_dir()  # DeepSpeed's own format
    assert (out / "final" / "model.safetensors").is_file()
    resumed = _resume_copy(out, tmp_path / "ds-resumed")
    _train(
        tiny_model_dir,
        tiny_prepared,
        resumed,
        *ds,
        **{"gradient-accumulation-steps": 2, "resume-from-checkpoint": "latest"},
    )
    _assert_same_losses(train_losses(resumed), train_losses(one), [3, 4])


def test_accelerate_launch_runs_the_same_training(full_runs, tiny_model_dir, tiny_prepared, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m aift train ...` (MULTI_CPU over gloo here) equals
    aift's own launcher, which runs `torchrun -m aift train`."""
    from aift.distributed.launch import find_free_port

    two, _ = full_runs
    out = tmp_path / "accelerate"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
    launcher += [f"--main_process_port={find_free_port()}", "--num_machines=1", "--mixed_precision=no"]
    launcher += ["--dynamo_backend=no", "-m", "aift", "train"]
    command = [*launcher, *train_args(tiny_model_dir, tiny_prepared, out, **{"save-steps": 0})]
    result = run_with_timeout(command, clean_env(), RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_same_losses(train_losses(out), train_losses(two), [1, 2, 3, 4])
