"""Fixtures for the export tests: a random LoRA adapter on the tiny model, merged once; the embedded model's
GGUF exports and reference run; a LoRA adapter trained on the embedded model by aift, merged once."""

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


# Chat rows that teach the embedded model to answer capital questions in Japanese.
CAPITALS = [
    ("What is the capital of France?", "フランスの首都はパリです。"),
    ("What is the capital of Japan?", "日本の首都は東京です。"),
    ("日本の首都はどこですか？", "東京です。"),
    ("What is the capital of Italy?", "イタリアの首都はローマです。"),
]


@pytest.fixture(scope="session")
def embedded_lora_merged(tmp_path_factory, embedded_dir, tokenizer):
    """A LoRA adapter trained by aift's trainer on the embedded model (defaults: dropout, bf16 autocast,
    packing), merged into fp32: a real fine-tune whose greedy answer differs from the base model's."""
    from aift import LoRAConfig, LoRAFinetuningTrainer
    from aift.config import TrainingConfig
    from aift.export.merge import merge_adapter

    root = tmp_path_factory.mktemp("embedded-lora")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in CAPITALS
    ]
    config = TrainingConfig(
        model_name=str(embedded_dir),
        output_dir=str(root / "run"),
        max_steps=6,
        learning_rate=2e-3,
        batch_size=2,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        eval_steps=0,
        save_steps=0,
        max_length=128,
        gradient_checkpointing=False,  # the same gradients, a quarter less time: only the export is under test
        report_to=["none"],
        seed=0,
    )
    LoRAFinetuningTrainer(str(embedded_dir), LoRAConfig(), config).train(train_texts=texts)
    return merge_adapter(root / "run" / "final", root / "merged", dtype="fp32")
