"""Tool calling over the OpenAI API: a request's ``tools`` and tool messages into a conversation, and the tool
calls a model writes in aift's tool format (``<tool_call>{"name", "arguments"}</tool_call>``, the Hermes format
of aift.data.tools, also Qwen2.5's and Qwen3's) back into OpenAI ``tool_calls``.

A model trained on tool conversations (`aift prepare` of rows with ``tools``) writes its calls in that format;
text that holds no well-formed call is returned as content, as any other answer. Calls in other syntaxes
(Llama 3.1's ``<|python_tag|>``, Mistral's ``[TOOL_CALLS]``) are not parsed: they come back as content.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aift.data.tools import CALL_OPEN, parse_calls
from aift.inference.runner import _held_back


def request_messages(messages: list[dict[str, Any]], tools: list[dict] | None, tool_choice: Any = None) -> list[dict]:
    """The conversation of a chat request: the tools declared on its system message (unless ``tool_choice`` is
    "none"), assistant ``tool_calls`` and ``tool`` results as they came (aift.data.conversation checks them)."""
    if not wants_tools(tools, tool_choice):
        return messages
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "tools": tools}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *messages]


def wants_tools(tools: list[dict] | None, tool_choice: Any) -> bool:
    return bool(tools) and tool_choice != "none"


def openai_calls(calls: list[dict]) -> list[dict]:
    """aift's parsed calls as OpenAI ``tool_calls`` (arguments as a JSON string, a fresh id each)."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": call["function"]["name"],
                "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False),
            },
        }
        for call in calls
    ]


def answer_message(answer: str, tools: bool) -> tuple[dict, bool]:
    """(the assistant message of a finished answer, whether it calls tools): with ``tools``, its calls as
    ``tool_calls`` and the text around them as content (None when there is none, as OpenAI answers)."""
    text, calls = parse_calls(answer) if tools else (answer, [])
    if not calls:
        return {"role": "assistant", "content": answer}, False
    return {"role": "assistant", "content": text or None, "tool_calls": openai_calls(calls)}, True


class ToolCallStream:
    """The streamed content of a request that may call tools: text is passed on until a ``<tool_call>`` starts
    (a tail that could still grow into one is held back); the calls go out at the end, whole."""

    def __init__(self):
        self.raw, self.shown, self.in_call = "", 0, False

    def feed(self, piece: str) -> str:
        """Adds generated text; returns the newly visible content."""
        self.raw += piece
        if not self.in_call and CALL_OPEN in self.raw:
            self.in_call = True
        end = self.raw.find(CALL_OPEN) if self.in_call else len(self.raw) - _held_back(self.raw, [CALL_OPEN])
        out, self.shown = self.raw[self.shown : max(end, self.shown)], max(end, self.shown)
        return out

    def finish(self, answer: str) -> tuple[str, list[dict]]:
        """(content not yet shown, OpenAI tool_calls) of the whole answer."""
        text, calls = parse_calls(answer)
        if not calls:
            return answer[self.shown :], []
        return text[self.shown :] if len(text) > self.shown else "", openai_calls(calls)
