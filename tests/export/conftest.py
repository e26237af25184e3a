"""Fixtures for the export tests: a random LoRA adapter on the tiny model, merged once; the embedded model's
GGUF exports and reference run; the shared LoRA run on the embedded model (trained_lora_run), merged once."""

from __future__ import annotations

import pytest
from post_helpers import make_lora_adapter


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir):
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-adapter"), prompt_format="chatml")


@pytest.fixture(scope="session")
def tiny_merged(tmp_path_factory, tiny_adapter):
    from aift.export.merge import merge_adapter

    return merge_adapter(tiny_adapter, tmp_path_factory.mktemp("merged") / "out", dtype="fp32")


@pytest.fixture(scope="session")
def embedded_gguf(tmp_path_factory, embedded_dir) -> dict:
    """The embedded model exported as f16 and as q8_0: {quant: path}."""
    from aift.export.gguf_writer import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {quant: export_gguf(embedded_dir, out / f"smollm2.{quant}.gguf", quant=quant) for quant in ("f16", "q8_0")}


@pytest.fixture(scope="session")
def embedded_reference(embedded_model, tokenizer):
    """The embedded model's ids, logits and greedy 20 tokens on the chat-template question, computed once."""
    from aift.export.verify import default_prompt, reference_run

    return reference_run(embedded_model, tokenizer, default_prompt(tokenizer))


@pytest.fixture(scope="session")
def embedded_lora_merged(tmp_path_factory, trained_lora_run):
    """The suite's shared real fine-tune (`aift train`, LoRA on the embedded model, defaults: dropout, bf16
    autocast, packing) merged into fp32: its greedy answer differs from the base model's."""
    from aift.export.merge import merge_adapter

    _, run = trained_lora_run
    return merge_adapter(run / "final", tmp_path_factory.mktemp("embedded-lora") / "merged", dtype="fp32")
