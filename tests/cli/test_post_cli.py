"""End-to-end CLI tests of the post-training commands: quantize, merge, export, generate, chat."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from post_helpers import make_lora_adapter

from aift.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_adapter(tmp_path_factory, tiny_model_dir):
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("cli-adapter"), prompt_format="chatml")


def test_merge_then_export_safetensors_and_gguf(tmp_path, cli_adapter, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(cli_adapter), "--output", str(merged), "--dtype", "fp32"]) == 0
    assert (merged / "model.safetensors").is_file()
    assert main(["merge", "--adapter", str(cli_adapter), "--output", str(merged)]) == 2  # not empty: refused
    assert "--overwrite" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert main(["export", "--model", str(merged), "--format", "safetensors", "--output", str(plain)]) == 0
    assert json.loads((plain / "aift_meta.json").read_text())["prompt_format"] == "chatml"
    gguf = tmp_path / "model.gguf"
    # The adapter folder itself: merged in a temp folder, written, read back and compared.
    code = main(["export", "--model", str(cli_adapter), "--format", "gguf", "--quant", "f32", "--output", str(gguf)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "read-back check passed" in out and "greedy 20 tokens identical" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_unsupported_and_non_gguf_output(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["export", "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "x.gguf")]) == 2
    assert "LlamaForCausalLM" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "x.bin")]) == 2
    assert ".gguf" in capsys.readouterr().err


def test_quantize_prints_the_benchmark(tmp_path, tiny_model_dir, capsys):
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--output", str(tmp_path / "q4")]
    assert main([*args, "--benchmark", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("latency p95", "generation (tokens/s)", "on disk (MB)", "perplexity", "mean KL"):
        assert row in out
    assert (tmp_path / "q4" / "config.json").is_file()


def test_generate_streams_the_answer(capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "--greedy", "--max-new-tokens", "20"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_in_a_terminal():
    import pexpect  # a dev dependency: `make setup` installs it, so its absence is a failure

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "aift", "chat", "--greedy", "--max-new-tokens", "16"]
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=300)
    try:
        child.expect_exact("you> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("assistant> ")
        child.expect("Paris")
        child.expect_exact("you> ")
        child.sendline("/history")
        child.expect_exact("(2 messages in the conversation)")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.sendline("/history")
        child.expect_exact("(0 messages in the conversation)")
        child.sendline("/exit")
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_trained_adapter_through_merge_gguf_and_generation(tmp_path, trained_lora_run, capsys):
    """A LoRA fine-tune by `aift train`, merged, exported to GGUF and read back: the same greedy answer."""
    from aift.export.verify import compare_models, load_gguf
    from aift.inference.runner import GenerationSettings, LoadedModel, load_for_inference, stream_answer

    _, run = trained_lora_run
    final = run / "final"
    assert (final / "adapter_config.json").is_file()
    merged, gguf = tmp_path / "merged", tmp_path / "tuned.f16.gguf"
    assert main(["merge", "--adapter", str(final), "--output", str(merged), "--dtype", "fp32"]) == 0
    # The read-back below compares with base + adapter itself, so the export's own check is skipped here.
    assert main(["export", "--model", str(merged), "--quant", "f16", "--output", str(gguf), "--no-verify"]) == 0
    question = [{"role": "user", "content": "日本の首都はどこですか？"}]
    settings = GenerationSettings(max_new_tokens=20, greedy=True)
    tuned = load_for_inference(str(final), device="cpu")  # base + adapter, format from final/aift_meta.json
    model, tokenizer = load_gguf(gguf)
    from_gguf = LoadedModel(model, tokenizer, tuned.prompt_format, str(gguf))
    answer = stream_answer(tuned, question, settings)
    assert answer and answer == stream_answer(from_gguf, question, settings)
    prompt = tuned.prompt_format.generation_prompt(question, tuned.tokenizer)
    report = compare_models(tuned.model, tuned.tokenizer, model, tokenizer, prompt, max_new_tokens=1)
    assert report["tokens_match"] and report["max_abs_logit_diff"] < 0.1
