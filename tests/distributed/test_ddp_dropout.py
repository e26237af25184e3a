"""With dropout on, 2 processes x batch 2 train like 1 process x batch 2 x 2 accumulation steps.

One torchrun launch (tests/distributed/dropout_worker.py, 2 processes over gloo) trains four variants of the
tiny llama, 6 steps each with the defaults (bf16 autocast, gradient checkpointing): LoRA with its default
dropout (0.05) and full fine-tuning with attention_dropout=0.1, each on padded and on packed batches. The same
variants then run in one process with 2 accumulation steps. Each micro-batch draws its dropout masks from
(seed, epoch, its index in the plan), so both layouts draw the same masks: equal losses and gradient norms at
every step. (Before, each process drew from its own RNG stream, and the losses parted from step 1 or 3 on.)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from dist_helpers import clean_env, run_with_timeout
from dropout_worker import STEPS, VARIANTS

from aift.distributed.launch import find_free_port

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
WORKER = Path(__file__).with_name("dropout_worker.py")


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama with dropout on the attention probabilities."""
    path = tmp_path_factory.mktemp("tiny-llama-dropout") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, dropout_model_dir, tiny_prepared) -> tuple[Path, Path]:
    """(2-process root, 1-process root), one output dir per variant under each."""
    root = tmp_path_factory.mktemp("ddp-dropout")
    dirs = [str(tiny_model_dir), str(dropout_model_dir), str(tiny_prepared)]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={find_free_port()}",
    ]
    for launcher, out in ((torchrun, root / "two"), ([sys.executable], root / "one")):
        result = run_with_timeout([*launcher, str(WORKER), *dirs, str(out)], clean_env(), timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    return root / "two", root / "one"


def _train_records(out: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["type"] == "train"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_processes_equal_one_with_accumulation_with_dropout_on(runs, name):
    two, one = (_train_records(root / name) for root in runs)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        a, b = two[step], one[step]
        assert abs(a["loss"] - b["loss"]) < TOLERANCE, f"{name} step {step}: loss {a['loss']} vs {b['loss']}"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOLERANCE), f"{name} step {step}: grad norm"
    resolved = yaml.safe_load((runs[0] / name / "config.yaml").read_text())
    training = resolved["TrainingConfig"]
    assert training["gradient_checkpointing"] and training["fp16"]  # the defaults: checkpointing, mixed precision
    if name.startswith("lora"):
        assert resolved["LoRAConfig"]["lora_dropout"] == 0.05  # LoRAConfig's default
