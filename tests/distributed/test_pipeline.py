"""torch.distributed.pipelining on gloo: the tiny llama cut into 2 stages computes the loss and gradients of the
whole model (2 real processes, GPipe with 2 micro-batches)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dist_helpers import clean_env, run_with_timeout
from transformers import AutoModelForCausalLM

from aift.distributed.launch import find_free_port
from aift.distributed.pipeline import PipelineSplitError, split_stages


def test_split_covers_every_layer_once(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    first, last = split_stages(model, 2)
    assert len(first.layers) + len(last.layers) == len(model.model.layers)
    assert first.embed_tokens is not None and first.lm_head is None
    assert last.embed_tokens is None and last.lm_head is not None
    with pytest.raises(PipelineSplitError, match="cannot cut 2 decoder layers into 3 stages"):
        split_stages(model, 3)


@pytest.mark.slow
def test_two_stage_gpipe_over_gloo_matches_the_whole_model(tiny_model_dir):
    worker = Path(__file__).with_name("pipeline_worker.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={find_free_port()}",
        str(worker),
        str(tiny_model_dir),
    ]
    result = run_with_timeout(command, clean_env(), timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = {r["rank"]: r for r in (json.loads(x) for x in result.stdout.splitlines() if x.startswith("{"))}
    assert sorted(reports) == [0, 1]
    last = reports[1]
    assert abs(last["pipe_loss"] - last["ref_loss"]) < 1e-5
    assert reports[0]["tied"] is True  # SmolLM2 ties embeddings: the two stages must add their gradients
    for report in reports.values():
        assert report["max_grad_diff"] < 1e-5
