"""`aift serve` with tools, driven by the official openai client against a real server on a free port.

The model is the 2-layer model of the embedded tokenizer, trained here for a few seconds on two conversations
rendered by aift's own data path (aift.data.formats, aift.data.masking): asked for Tokyo's weather with a
weather tool it calls the tool in aift's tool format, greeted it answers in words. So the server parses a call
the model really wrote, returns OpenAI tool_calls (plain and streamed), and returns an answer without a call as
content; the parser itself is tested on its own below."""

from __future__ import annotations

import json

import openai
import pytest
import torch
import torch.nn.functional as F
from serve_helpers import ThreadServer

from aift.data.formats import get_format
from aift.data.masking import encode
from aift.data.packing import IGNORE_INDEX
from aift.data.tools import parse_calls
from aift.serve import Engine, create_app, load_served_models
from aift.serve.tools import ToolCallStream, request_messages

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Tokyo?"}]
HELLO = [{"role": "user", "content": "Hello!"}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}


def _train_on_the_format(model, tokenizer) -> None:
    """Full training of the tiny model on a call and on a greeting until it writes them back (greedy)."""
    fmt = get_format("template")
    examples = [ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
                HELLO + [{"role": "assistant", "content": "Hello! How can I help?"}]]  # fmt: skip
    batches = []
    for conversation in examples:
        encoded = encode(fmt.render(request_messages(conversation, TOOLS), tokenizer), tokenizer, 1024)
        targets = torch.tensor([*encoded.labels[1:], IGNORE_INDEX])
        where = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        batches.append((torch.tensor([encoded.input_ids]), where, targets[where]))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine 2 threads spin at every barrier, many times slower (serve_helpers)
    try:
        for _ in range(70):  # logits of the trained positions only: the vocabulary is most of the cost
            loss = sum(
                F.cross_entropy(model.lm_head(model.model(input_ids=ids).last_hidden_state[0, where]), target)
                for ids, where, target in batches
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _train_on_the_format(model, tokenizer)
    folder = tmp_path_factory.mktemp("tool-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine = Engine(load_served_models(str(folder), name="tools", device="cpu"))
    with ThreadServer(create_app(engine)) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


pytestmark = pytest.mark.slow


def test_a_call_the_model_writes_comes_back_as_tool_calls(client):
    reply = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Tokyo"}

    chunks = list(client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, temperature=0,
                                                 max_tokens=40, stream=True))  # fmt: skip
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no call text as content
    streamed = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == [
        (0, "get_weather", {"city": "Tokyo"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_text_is_content(client):
    """Greeted, with the tools offered, the model answers in words; with tool_choice none no call is parsed."""
    plain = client.chat.completions.create(model="tools", messages=HELLO, tools=TOOLS, temperature=0, max_tokens=20)
    assert plain.choices[0].message.content == "Hello! How can I help?"
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"
    none = client.chat.completions.create(
        model="tools", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content is not None


def test_the_call_and_its_result_go_back_into_the_prompt(client, tokenizer):
    """A follow-up carrying the assistant's tool_calls and the tool's result: its prompt is exactly the template's
    rendering of that history in aift's tool format (usage counts its tokens)."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", **CALL}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]  # fmt: skip
    reply = client.chat.completions.create(model="tools", messages=history, tools=TOOLS, temperature=0, max_tokens=4)
    prompt = get_format("template").generation_prompt(request_messages(history, TOOLS), tokenizer)
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with pytest.raises(openai.BadRequestError, match="followed by its tool results"):
        client.chat.completions.create(model="tools", messages=[*history[:2], *HELLO], tools=TOOLS, max_tokens=4)


# ------------------------------------------------------------------------------------------------ the parser


def test_parse_calls_reads_every_well_formed_call_and_keeps_the_rest():
    text = (
        'Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "b"}</tool_call>'
    )
    content, calls = parse_calls(text)
    assert content == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("a", {"x": 1}), ("b", {})]
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_calls(broken) == (broken, [])
    assert parse_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name: not a call
    assert parse_calls("just words") == ("just words", [])


def test_streamed_content_stops_where_a_call_starts():
    stream = ToolCallStream()
    pieces = ["Sure", ". <tool", "_call>", '\n{"name": "a", "arguments": {}}\n</tool_call>']
    shown = "".join(stream.feed(p) for p in pieces)
    assert shown == "Sure. "  # "<tool" was held back until it turned out to open a call
    rest, calls = stream.finish("".join(pieces))
    assert rest == "" and [c["function"]["name"] for c in calls] == ["a"]
    words = ToolCallStream()
    assert words.feed("a <to") == "a " and words.feed("day") == "<today"
    assert words.finish("a <today") == ("", [])
