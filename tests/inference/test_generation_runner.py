"""Loading for inference (adapter, merged, quantized), prompt formats from aift_meta.json, streaming, chat history."""

from __future__ import annotations

import io

import pytest
import torch
from post_helpers import base_plus_adapter

from aift.data.formats import TemplateFormat, get_format
from aift.inference.chat import ChatSession, run_chat
from aift.inference.runner import GenerationSettings, LoadedModel, _AnswerStream, load_for_inference, stream_answer

GREEDY = GenerationSettings(max_new_tokens=8, greedy=True)


@pytest.fixture(scope="module")
def embedded(embedded_dir):
    return load_for_inference(str(embedded_dir), device="cpu")


def test_adapter_folder_alone_brings_base_and_format(alpaca_adapter, tiny_model_dir, tokenizer):
    loaded = load_for_inference(str(alpaca_adapter), device="cpu")
    assert loaded.prompt_format.name == "alpaca"  # from aift_meta.json, not the tokenizer's template
    ids = tokenizer("### 指示:\nこんにちは\n\n### 応答:\n", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = base_plus_adapter(tiny_model_dir, alpaca_adapter)(ids).logits
        assert (loaded.model(ids).logits - expected).abs().max() < 1e-4
    prompt = loaded.prompt_format.generation_prompt([{"role": "user", "content": "日本の首都は？"}], tokenizer)
    assert prompt.endswith("### 応答:\n")


def test_explicit_format_overrides_with_a_warning(alpaca_adapter, caplog):
    loaded = load_for_inference(str(alpaca_adapter), device="cpu", prompt_format="chatml")
    assert loaded.prompt_format.name == "chatml"
    assert "alpaca" in caplog.text and "chatml" in caplog.text


def test_streamed_pieces_make_the_answer(embedded):
    pieces: list[str] = []
    settings = GenerationSettings(max_new_tokens=20, greedy=True)
    answer = stream_answer(
        embedded, [{"role": "user", "content": "What is the capital of France?"}], settings, pieces.append
    )
    assert "Paris" in answer and len(pieces) > 1
    assert "".join(pieces) == answer
    assert "<|im_end|>" not in answer


def test_answer_stream_holds_back_partial_markers(tokenizer):
    loaded = LoadedModel(None, tokenizer, get_format("chatml"), "x")
    shown: list[str] = []
    stream = _AnswerStream(loaded, shown.append)
    for piece in ["Hel", "lo<|im", "_e", "nd|>\n<|im_start|>user"]:
        stream.feed(piece)
    assert stream.finish() == "Hello" and "".join(shown) == "Hello"
    rinna = _AnswerStream(LoadedModel(None, tokenizer, get_format("rinna"), "x"), (shown := []).append)
    for piece in ["一行目<N", "L>二行目", "<NL>ユーザー: 次"]:
        rinna.feed(piece)
    assert rinna.finish() == "一行目\n二行目" and "".join(shown) == "一行目\n二行目"


class RecordingFormat(TemplateFormat):
    """The tokenizer's template, remembering every prompt it renders."""

    def __init__(self):
        self.prompts: list[str] = []

    def generation_prompt(self, messages, tokenizer=None):
        self.prompts.append(super().generation_prompt(messages, tokenizer))
        return self.prompts[-1]


def test_chat_keeps_history_and_resets(embedded):
    fmt = RecordingFormat()
    session = ChatSession(LoadedModel(embedded.model, embedded.tokenizer, fmt, "embedded"), GREEDY)
    inputs = iter(["What is the capital of France?", "/history", "And of Japan?", "/reset", "Hi", "/history", "/exit"])
    out = io.StringIO()
    assert run_chat(session, read=lambda _: next(inputs), out=out) == 3
    text = out.getvalue()
    assert "(2 messages in the conversation)" in text and "(conversation reset)" in text
    after_reset_text = text.split("(conversation reset)")[1]
    assert "(2 messages in the conversation)\n  user: Hi\n" in after_reset_text
    assert "France" not in after_reset_text and text.endswith("bye\n")
    first, second, after_reset = fmt.prompts
    assert "France" in first and "Japan" not in first
    assert "France" in second and "Japan" in second  # the history went into the second prompt
    assert "France" not in after_reset and "Japan" not in after_reset
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_quantized_folder_loads_the_same_way(tmp_path, tiny_model_dir):
    import bitsandbytes as bnb

    from aift.quant.optimizer import QuantizationOptimizer

    QuantizationOptimizer(str(tiny_model_dir), device="cpu").quantize_to_4bit(tmp_path / "q4")
    loaded = load_for_inference(str(tmp_path / "q4"), device="cpu")
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    answer = stream_answer(loaded, [{"role": "user", "content": "hi"}], GREEDY)
    assert isinstance(answer, str)
