"""Tool calls and reasoning traces in SFT data: the shapes that carry them, how each format renders them, and that
exactly the assistant's text, tool-call JSON and reasoning are trained (decoded from the prepared labels)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from aift.data import DataError
from aift.data.conversation import normalize
from aift.data.formats import get_format
from aift.data.masking import encode
from aift.data.packing import IGNORE_INDEX
from aift.data.prepare import prepare_dataset
from aift.data.reasoning import ThinkingOnly, drop_earlier_thinking, thinking_runs
from aift.data.sources import load_conversations

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
FIXTURES = Path(__file__).parent / "fixtures"
MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>'
OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "東京の天気は?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "東京"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "晴れ"}'},
        {"role": "assistant", "content": "晴れです。"},
    ],
    "tools": [WEATHER],
}
SHAREGPT_ROW = {  # the same conversation as LLaMA-Factory writes it: tools as JSON text, bare schemas
    "conversations": [
        {"from": "human", "value": "東京の天気は?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "東京"}}'},
        {"from": "observation", "value": '{"sky": "晴れ"}'},
        {"from": "gpt", "value": "晴れです。"},
    ],
    "tools": json.dumps([WEATHER["function"]]),
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _conversation(tmp_path: Path, row: dict) -> list[dict]:
    loaded = load_conversations("jsonl", _write_jsonl(tmp_path / "row.jsonl", [row]), strict=True)
    return loaded.examples[0]


def _trained_pieces(tokenizer, rendered) -> list[str]:
    """The trained tokens of an encoded example, decoded, one string per run of consecutive trained tokens."""
    encoded = encode(rendered, tokenizer, max_length=4096)
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.fixture(scope="module")
def qwen3_tokenizer(tokenizer):
    """The embedded tokenizer with Qwen3's chat template (it renders tools and reasoning_content itself)."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = (FIXTURES / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
    return copied


def test_openai_and_sharegpt_rows_give_the_same_conversation(tmp_path):
    openai = _conversation(tmp_path, OPENAI_ROW)
    assert openai[0] == {"role": "system", "content": "", "tools": [WEATHER]}
    assert openai[2]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}, "id": "c1"}
    ]
    assert openai[3] == {"role": "tool", "content": '{"sky": "晴れ"}', "tool_call_id": "c1"}
    del openai[2]["tool_calls"][0]["id"], openai[3]["tool_call_id"]  # ShareGPT rows have no call ids
    assert _conversation(tmp_path, SHAREGPT_ROW) == openai


def test_template_without_tools_renders_aifts_format_and_trains_only_the_answers(tmp_path, tokenizer):
    """SmolLM2's template knows no tools: the conversation is lowered into aift's (Hermes) format; the schemas,
    the question and the tool result are prompt, the call JSON and the final answer are trained."""
    rendered = get_format("template").render(_conversation(tmp_path, OPENAI_ROW), tokenizer)
    assert rendered.text == (
        f"<|im_start|>system\n{TOOLS_BLOCK}<|im_end|>\n<|im_start|>user\n東京の天気は?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"sky": "晴れ"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n晴れです。<|im_end|>\n"
    )
    assert _trained_pieces(tokenizer, rendered) == [f"{CALL}<|im_end|>", "晴れです。<|im_end|>"]


@pytest.mark.parametrize("name", ["alpaca", "chatml", "completion"])
def test_every_turn_format_trains_the_call_json_and_masks_the_schemas_and_result(name, tmp_path, tokenizer):
    fmt = get_format(name)
    rendered = fmt.render(_conversation(tmp_path, OPENAI_ROW), tokenizer)
    answers = [fmt.answer_text(CALL), fmt.answer_text("晴れです。")]
    assert rendered.trained_text == answers[0] + fmt.end_of_turn(tokenizer, False) + answers[1] + fmt.end_of_turn(
        tokenizer, True
    )
    assert rendered.text.index(TOOLS_BLOCK) < rendered.text.index(CALL)  # the schemas are in the prompt
    assert '<tool_response>\n{"sky": "晴れ"}\n</tool_response>' in rendered.text


def test_template_with_tools_renders_them_itself(tmp_path, qwen3_tokenizer):
    """Qwen3's template is given the tools and the tool_calls; the trained spans are each answer as it writes
    it (Qwen3 puts an empty think block before the final answer), the tool result is masked."""
    conversation = _conversation(tmp_path, {**OPENAI_ROW, "messages": OPENAI_ROW["messages"]})
    rendered = get_format("template").render(conversation, qwen3_tokenizer)
    assert rendered.text.startswith("<|im_start|>system\n# Tools\n")
    assert _trained_pieces(qwen3_tokenizer, rendered) == [
        f"{CALL}<|im_end|>",
        "<think>\n\n</think>\n\n晴れです。<|im_end|>",
    ]
    prompt = get_format("template").generation_prompt(conversation[:-1], qwen3_tokenizer)
    assert prompt == rendered.text[: rendered.text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]


def test_tool_turn_errors_name_what_is_wrong():
    user = {"role": "user", "content": "q"}
    with pytest.raises(DataError, match="followed by its tool results"):
        normalize([user, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}])
    calls = [{"function": {"name": "f", "arguments": "{}"}}]
    with pytest.raises(DataError, match="followed by its tool results"):
        normalize([user, {"role": "assistant", "tool_calls": calls}, {"role": "user", "content": "q2"}])
    with pytest.raises(DataError, match="tool call 1 arguments is not valid JSON"):
        normalize([user, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}])
    with pytest.raises(DataError, match="tool call 1 has no function name"):
        normalize([user, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}])


def test_shape_error_lists_the_tool_shapes(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"dialogue": "x"}])
    with pytest.raises(DataError) as error:
        load_conversations("jsonl", path)
    assert "messages + tools (OpenAI tool calling" in str(error.value)
    assert "conversations + tools (ShareGPT function_call/observation" in str(error.value)
    assert "reasoning_content or <think>" in str(error.value)


# ------------------------------------------------------------------------------------------------- reasoning


def test_think_tags_and_reasoning_content_are_one_reasoning():
    user = {"role": "user", "content": "q"}
    inline = normalize([user, {"role": "assistant", "content": "<think>\n考える\n</think>\n\n答え"}])
    field = normalize([user, {"role": "assistant", "content": "答え", "reasoning_content": "考える"}])
    assert inline == field == [user, {"role": "assistant", "content": "答え", "reasoning_content": "考える"}]
    empty = normalize([user, {"role": "assistant", "content": "<think></think>答え"}])
    assert empty[1] == {"role": "assistant", "content": "答え"}  # an empty block is no reasoning
    for only in ("<think>考える</think>", "<think></think>", "<think>\n</think>\n\n"):
        with pytest.raises(ThinkingOnly):
            normalize([user, {"role": "assistant", "content": only}])
    with pytest.raises(DataError, match="not closed"):
        normalize([user, {"role": "assistant", "content": "<think>never closed"}])


def test_reasoning_is_trained_in_every_turn_unless_dropped_before_the_last_question(tokenizer):
    rows = [json.loads(line) for line in (EXAMPLES / "reasoning.jsonl").read_text(encoding="utf-8").splitlines()]
    conversation = normalize(rows[0]["messages"])
    chatml = get_format("chatml")
    kept = _trained_pieces(tokenizer, chatml.render(conversation, tokenizer))
    assert kept == ["<think>\n12×30 = 360。\n</think>\n\n360です。<|im_end|>",
                    "<think>\n360×2 = 720。\n</think>\n\n720です。<|im_end|>"]  # fmt: skip
    dropped = chatml.render(drop_earlier_thinking(conversation), tokenizer)
    assert _trained_pieces(tokenizer, dropped) == ["360です。<|im_end|>", kept[1]]
    assert "12×30 = 360" not in dropped.text


def test_qwen3_template_needs_drop_earlier_thinking_for_multi_turn_reasoning(qwen3_tokenizer):
    """Qwen3's template leaves out the reasoning of earlier answers, so keeping it cannot be rendered: the error
    says which flag fixes it, and with the flag the last answer's reasoning is trained."""
    conversation = normalize(json.loads((EXAMPLES / "reasoning.jsonl").read_text().splitlines()[0])["messages"])
    with pytest.raises(DataError, match="--drop-earlier-thinking"):
        get_format("template").render(conversation, qwen3_tokenizer)
    rendered = get_format("template").render(drop_earlier_thinking(conversation), qwen3_tokenizer)
    assert _trained_pieces(qwen3_tokenizer, rendered) == [
        "360です。<|im_end|>",
        "<think>\n360×2 = 720。\n</think>\n\n720です。<|im_end|>",
    ]


def test_prepare_counts_thinking_only_rows_and_records_the_option(tmp_path, tokenizer):
    out = prepare_dataset(
        MODEL, "jsonl", EXAMPLES / "reasoning.jsonl", output_dir=tmp_path / "r", max_length=256, val_ratio=0,
        drop_earlier_thinking=True, num_proc=1,
    )  # fmt: skip
    info = json.loads((out / "prepare.json").read_text())
    assert info["counts"]["dropped_reasons"] == {"answer is only thinking": 2}
    assert info["counts"]["kept"] == 6 and info["drop_earlier_thinking"] is True
    from datasets import load_from_disk

    row = load_from_disk(str(out))["train"][0]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0])
    assert trained.count("<think>") == 1 and trained.endswith("です。<|im_end|>")


def test_preview_marks_the_thinking(tmp_path):
    from aift.cli.preview import styled_text
    from aift.data.preview import preview_dataset
    from aift.webui.data import preview

    out = prepare_dataset(MODEL, "jsonl", EXAMPLES / "reasoning.jsonl", output_dir=tmp_path / "p", max_length=256,
                          val_ratio=0, num_proc=1)  # fmt: skip
    example = preview_dataset(out, n=1).examples[0]
    thinking = "".join(text for text, trained, think in example.styled() if think and trained)
    assert thinking.startswith("<think>") and thinking.endswith("</think>") and thinking.count("<think>") == 2
    assert not any(think for text, trained, think in example.styled() if "です" in text)
    text = styled_text(example)
    assert {str(span.style) for span in text.spans} == {"bold green", "dim", "bold magenta"}
    runs = preview(out, 1, "train")["examples"][0]["runs"]
    assert [r for r in runs if r[2]] and all(len(r) == 3 for r in runs)


def test_thinking_runs_split_at_the_tags():
    runs = [("prompt ", False), ("<think>\nhm\n</think>\n\nanswer", True)]
    assert thinking_runs(runs) == [("prompt ", False, False), ("<think>\nhm\n</think>", True, True),
                                   ("\n\nanswer", True, False)]  # fmt: skip


def test_drop_earlier_thinking_is_refused_where_it_does_not_apply(tmp_path, capsys):
    from aift.cli import main

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    argv = ["prepare", "--task", "preference", "--source-path", str(pairs), "--drop-earlier-thinking"]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert "--drop-earlier-thinking does not apply" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
