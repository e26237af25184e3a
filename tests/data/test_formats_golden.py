"""Golden tests of every prompt format: exact strings, trained spans, generation prompts, answer round trips."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from aift.data import DataError
from aift.data.formats import FORMATS, get_format, resolve_format, stored_format
from aift.models.registry import SUPPORTED_MODELS

SINGLE = [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"}]
MULTI = [
    {"role": "system", "content": "短く答えて。"},
    {"role": "user", "content": "1たす1は？"},
    {"role": "assistant", "content": "2です。"},
    {"role": "user", "content": "では2たす2は？"},
    {"role": "assistant", "content": "4です。\n簡単です。"},
]
EN_SINGLE = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
EN_INPUT = [
    {"role": "user", "content": "Translate.", "input": "Good morning."},
    {"role": "assistant", "content": "Bonjour."},
]

EN_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
EN_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
STABLELM_SYSTEM = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"

# (format, conversation, exact text, exact trained text) with the default end marker "</s>" (no tokenizer).
GOLDEN = [
    (
        "alpaca",
        EN_SINGLE,
        f"{EN_PREAMBLE}\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>",
        "Blue.</s>",
    ),
    (
        "alpaca",
        EN_INPUT,
        f"{EN_PREAMBLE_INPUT}\n\n### Instruction:\nTranslate.\n\n### Input:\nGood morning.\n\n### Response:\nBonjour.</s>",
        "Bonjour.</s>",
    ),
    (
        "alpaca",
        SINGLE,
        "### 指示:\n日本の首都は？\n\n### 応答:\n東京です。</s>",
        "東京です。</s>",
    ),
    (
        "alpaca",
        MULTI,
        "短く答えて。\n\n### 指示:\n1たす1は？\n\n### 応答:\n2です。</s>\n\n### 指示:\nでは2たす2は？\n\n### 応答:\n"
        "4です。\n簡単です。</s>",
        "2です。</s>4です。\n簡単です。</s>",
    ),
    (
        "chatml",
        SINGLE,
        "<|im_start|>user\n日本の首都は？<|im_end|>\n<|im_start|>assistant\n東京です。<|im_end|>\n",
        "東京です。<|im_end|>",
    ),
    (
        "chatml",
        MULTI,
        "<|im_start|>system\n短く答えて。<|im_end|>\n<|im_start|>user\n1たす1は？<|im_end|>\n<|im_start|>assistant\n"
        "2です。<|im_end|>\n<|im_start|>user\nでは2たす2は？<|im_end|>\n<|im_start|>assistant\n4です。\n簡単です。<|im_end|>\n",
        "2です。<|im_end|>4です。\n簡単です。<|im_end|>",
    ),
    (
        "alpaca",
        [{"role": "user", "content": "要約して", "input": "長い文"}, {"role": "assistant", "content": "短い文"}],
        "### 指示:\n要約して\n\n### 入力:\n長い文\n\n### 応答:\n短い文</s>",
        "短い文</s>",
    ),
    ("llama2", SINGLE, "<s>[INST] 日本の首都は？ [/INST] 東京です。 </s>", " 東京です。 </s>"),
    (
        "llama2",
        MULTI,
        "<s>[INST] <<SYS>>\n短く答えて。\n<</SYS>>\n\n1たす1は？ [/INST] 2です。 </s><s>[INST] では2たす2は？ [/INST] "
        "4です。\n簡単です。 </s>",
        " 2です。 </s> 4です。\n簡単です。 </s>",
    ),
    (
        "stablelm-ja",
        SINGLE,
        f"{STABLELM_SYSTEM}\n\n### 指示: \n日本の首都は？\n\n### 応答: \n東京です。</s>",
        "東京です。</s>",
    ),
    (
        "stablelm-ja",
        [{"role": "user", "content": "要約して", "input": "長い文"}, {"role": "assistant", "content": "短い文"}],
        f"{STABLELM_SYSTEM}\n\n### 指示: \n要約して\n\n### 入力: \n長い文\n\n### 応答: \n短い文</s>",
        "短い文</s>",
    ),
    (
        "stablelm-ja",
        MULTI,
        "短く答えて。\n\n### 指示: \n1たす1は？\n\n### 応答: \n2です。</s>\n\n### 指示: \nでは2たす2は？\n\n### 応答: \n"
        "4です。\n簡単です。</s>",
        "2です。</s>4です。\n簡単です。</s>",
    ),
    ("rinna", SINGLE, "ユーザー: 日本の首都は？<NL>システム: 東京です。</s>", "東京です。</s>"),
    (
        "rinna",
        MULTI,
        "短く答えて。<NL>ユーザー: 1たす1は？<NL>システム: 2です。<NL>ユーザー: では2たす2は？<NL>システム: "
        "4です。<NL>簡単です。</s>",
        "2です。<NL>4です。<NL>簡単です。</s>",
    ),
    (
        "user-assistant",
        SINGLE,
        "<|user|>日本の首都は？<|endoftext|>\n<|assistant|>東京です。<|endoftext|>",
        "東京です。<|endoftext|>",
    ),
    (
        "user-assistant",
        MULTI,
        "<|system|>短く答えて。<|endoftext|>\n<|user|>1たす1は？<|endoftext|>\n<|assistant|>2です。<|endoftext|>\n"
        "<|user|>では2たす2は？<|endoftext|>\n<|assistant|>4です。\n簡単です。<|endoftext|>",
        "2です。<|endoftext|>4です。\n簡単です。<|endoftext|>",
    ),
    ("completion", SINGLE, "日本の首都は？\n東京です。</s>", "東京です。</s>"),
    (
        "completion",
        MULTI,
        "短く答えて。\n\n1たす1は？\n2です。</s>\nでは2たす2は？\n4です。\n簡単です。</s>",
        "2です。</s>4です。\n簡単です。</s>",
    ),
]


@pytest.mark.parametrize(
    ("name", "conversation", "text", "trained"), GOLDEN, ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)]
)
def test_golden_render(name, conversation, text, trained):
    rendered = get_format(name).render(conversation)
    assert rendered.text == text
    assert rendered.trained_text == trained
    assert rendered.reference == conversation[-1]["content"]
    # The prompt for the last answer is the generation prompt of the history before it.
    assert rendered.prompt == get_format(name).generation_prompt(conversation[:-1])
    assert text.startswith(rendered.prompt)


def test_every_format_has_golden_single_and_multi_turn():
    covered = {(name, len(conv) > 2) for name, conv, _, _ in GOLDEN} | {("template", False), ("template", True)}
    assert covered == {(name, multi) for name in FORMATS for multi in (False, True)}


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_golden_template_uses_the_tokenizers_chat_template(tokenizer):
    fmt = get_format("template")
    single = fmt.render(SINGLE, tokenizer)
    assert single.text == (
        f"{SMOL_SYSTEM}<|im_start|>user\n日本の首都は？<|im_end|>\n<|im_start|>assistant\n東京です。<|im_end|>\n"
    )
    assert single.trained_text == "東京です。<|im_end|>"
    multi = fmt.render(MULTI, tokenizer)
    assert multi.text == get_format("chatml").render(MULTI).text  # SmolLM2's template is ChatML
    assert multi.trained_text == "2です。<|im_end|>4です。\n簡単です。<|im_end|>"
    assert multi.prompt == fmt.generation_prompt(MULTI[:-1], tokenizer)
    assert fmt.generation_prompt(SINGLE[:1], tokenizer).endswith("<|im_start|>assistant\n")


def test_end_marker_comes_from_the_tokenizer(tokenizer):
    assert get_format("alpaca").render(SINGLE, tokenizer).trained_text == "東京です。<|im_end|>"
    assert get_format("rinna").render(SINGLE, tokenizer).text.endswith("東京です。<|im_end|>")


GENERATED = {
    "alpaca": ("東京です。</s>\n\n### 指示:\n次の質問", "東京です。"),
    "chatml": ("東京です。<|im_end|>\n<|im_start|>user\n", "東京です。"),
    "llama2": (" 東京です。 </s><s>[INST] 次", "東京です。"),
    "stablelm-ja": ("東京です。\n\n### 指示: \n次", "東京です。"),
    "rinna": ("東京です。<NL>渋谷も有名です。<NL>ユーザー: ありがとう", "東京です。\n渋谷も有名です。"),
    "user-assistant": ("東京です。<|endoftext|>\n<|user|>次", "東京です。"),
    "completion": ("東京です。</s>", "東京です。"),
}


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "template"])
def test_parse_answer_round_trip(name):
    fmt = get_format(name)
    rendered = fmt.render(MULTI)
    # What the model emits after the prompt, when it reproduces its training text, parses back to the answer.
    assert fmt.parse_answer(rendered.text[len(rendered.prompt) :]) == MULTI[-1]["content"]
    generated, answer = GENERATED[name]
    assert fmt.parse_answer(generated) == answer


def test_parse_answer_template(tokenizer):
    fmt = get_format("template")
    assert fmt.parse_answer("東京です。<|im_end|>\n<|im_start|>user\n", tokenizer) == "東京です。"


def test_registry_formats_are_known_names():
    assert {spec.prompt_format for spec in SUPPORTED_MODELS.values()} <= set(FORMATS)
    assert SUPPORTED_MODELS["rinna/japanese-gpt-neox-3.6b-instruction-sft"].prompt_format == "rinna"
    assert SUPPORTED_MODELS["stabilityai/japanese-stablelm-3b-4e1t-instruct"].prompt_format == "stablelm-ja"


def test_resolve_auto_order(tokenizer, tmp_path):
    assert resolve_format("smollm2-135m-instruct", tokenizer).name == "template"
    assert resolve_format("rinna/japanese-gpt-neox-3.6b-instruction-sft", None).name == "rinna"
    assert resolve_format("stabilityai/japanese-stablelm-3b-4e1t-instruct", None).name == "stablelm-ja"
    assert resolve_format("gpt2", None).name == "completion"
    assert resolve_format(str(tmp_path), tokenizer).name == "template"  # unregistered, has a template
    assert resolve_format("someone/unknown-base-model", None).name == "alpaca"  # no template: (Japanese) alpaca
    (tmp_path / "aift_meta.json").write_text(json.dumps({"prompt_format": "rinna"}))
    assert stored_format(tmp_path) == "rinna"
    assert resolve_format(str(tmp_path), tokenizer).name == "rinna"  # stored beats the template


def test_resolve_warns_on_mismatch(tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aift.data.formats"):
        assert resolve_format("smollm2-135m-instruct", tokenizer, "chatml").name == "chatml"
    assert "'template'" in caplog.text and "'chatml'" in caplog.text
    caplog.clear()
    (tmp_path / "prepare.json").write_text(json.dumps({"format": "user-assistant"}))
    with caplog.at_level(logging.WARNING, logger="aift.data.formats"):
        resolve_format(str(tmp_path), tokenizer, "alpaca")
    assert "'user-assistant'" in caplog.text and "'alpaca'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aift.data.formats"):
        resolve_format("smollm2-135m-instruct", tokenizer, "template")
    assert caplog.text == ""


def test_unknown_format_lists_valid_ones(tokenizer):
    with pytest.raises(DataError, match="valid formats: auto, alpaca, chatml, llama2, template"):
        resolve_format("smollm2-135m-instruct", tokenizer, "vicuna")


def test_template_without_chat_template_is_a_clear_error(tokenizer):
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        get_format("template").render(SINGLE, None)
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(DataError, match="choose another --format"):
        resolve_format("someone/base-model", no_template, "template")


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([], "empty"),
        ([{"role": "assistant", "content": "hi"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "no content"),
        ([{"role": "robot", "content": "a"}], "unknown role"),
        ([{"role": "user", "content": "a"}], "end with a message from the assistant"),
    ],
)
def test_bad_conversations(conversation, message):
    with pytest.raises(DataError, match=message):
        get_format("chatml").render(conversation)


def test_user_assistant_strings_parse_back_to_the_conversation():
    fmt = get_format("user-assistant")
    assert fmt.parse_conversation(fmt.render(MULTI).text) == MULTI
