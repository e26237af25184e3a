"""Shared fixtures: the embedded model (loaded once per session) and a 2-layer model from its config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the hub: fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The environment sets PYTHONDONTWRITEBYTECODE=1 and `make` installs with `pip --no-compile`, so without this
# every process a test starts (DDP workers, CLI, servers, bench workers, the wheel test's venv) would compile
# torch, transformers & co. from source again: measured 22.5 s of CPU to import aift.cli, transformers and peft
# in such a venv, 9.7 s once the .pyc files exist. The suite writes them once and every later process reads them.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once into $AIFT_HOME)."""
    from aift.models.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from aift.models.loading import load_tokenizer

    return load_tokenizer(str(embedded_dir))


@pytest.fixture(scope="session")
def embedded_model(embedded_dir):
    """The real model in fp32, eval mode. Do not modify it in a test: it is shared."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir, tokenizer) -> Path:
    """A 2-layer, 64-wide Llama with the embedded model's real tokenizer and vocabulary, random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(embedded_dir)
    config.num_hidden_layers = 2
    config.hidden_size = 64
    config.intermediate_size = 128
    config.num_attention_heads = 4
    config.num_key_value_heads = 2
    config.head_dim = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def trained_lora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(prepared dataset, run dir): 40 rows of the bundled Japanese Q&A and a 6-step LoRA run of the embedded
    model through `aift train` (bf16, eval every 3 steps, system metrics). One real run shared by the
    end-to-end tests (eval, report, merge, export, serving): tests may add files to the run dir, never change final/."""
    from aift.cli import main
    from aift.data.prepare import prepare_dataset

    work = tmp_path_factory.mktemp("e2e")
    dataset = prepare_dataset(
        source="jsonl",
        source_path=REPO / "data" / "ja_qa.jsonl",
        num_samples=40,
        max_length=96,
        val_ratio=0.2,
        output_dir=work / "prepared",
    )
    run = work / "results" / "lora"
    argv = ["train", "--model-name", "smollm2-135m-instruct", "--dataset-path", str(dataset), "--output-dir", str(run)]
    argv += ["--use-lora", "--lora-r", "8", "--batch-size", "4", "--max-steps", "6", "--learning-rate", "1e-3"]
    argv += ["--warmup-steps", "0", "--eval-steps", "3", "--logging-steps", "1", "--save-steps", "0"]
    argv += ["--max-length", "96", "--bf16", "--no-gradient-checkpointing", "--report-to", "none"]
    argv += ["--collect-metrics", "--no-tcmalloc"]
    assert main(argv) == 0
    return dataset, run


@pytest.fixture
def native_cpu_bf16(monkeypatch):
    """Takes the bf16 path as on a CPU with bf16 instructions, for tests about bf16 itself (on an AVX2-only
    CPU aift trains in fp32; its bf16 is emulated, slow but correct, so tiny models still run it)."""
    from aift.utils import gpu

    monkeypatch.setattr(gpu, "cpu_has_native_bf16", lambda: True)


@pytest.fixture(scope="module")
def packed_batch():
    """Two packed rows of random token ids (documents of 30+20+14 and 50+9 tokens, 64 long), labels = inputs."""
    from aift.data.packing import PackedCollator

    g = torch.Generator().manual_seed(1)
    rows = [[{"input_ids": torch.randint(0, 49152, (n,), generator=g).tolist()} for n in lens] for lens in
            ([30, 20, 14], [50, 9])]  # fmt: skip
    for row in rows:
        for ex in row:
            ex["labels"] = ex["input_ids"]
    return PackedCollator(pad_token_id=2, max_length=64)(rows)
