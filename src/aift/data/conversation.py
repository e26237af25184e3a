"""A conversation and what a prompt format makes of it: the interface every format implements.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``: an
optional system message first, then user and assistant turns in alternation (``normalize`` checks it and
gives the canonical roles). Tools, tool calls and results are described in aift.data.tools, reasoning
traces in aift.data.reasoning. A ``PromptFormat`` renders it into the training text and the character spans
that are trained (``Rendered``); the formats themselves and the choice of one are in aift.data.formats.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from aift.data import DataError
from aift.data.reasoning import CLOSE, OPEN, ThinkingOnly, split_thinking
from aift.data.tools import parse_tool_calls, parse_tools, tool_result

Message = dict[str, Any]  # role and content (str); system: tools; assistant: reasoning_content, tool_calls

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",  # OpenAI's older name of a function result
    "observation": "tool",  # ShareGPT's (LLaMA-Factory)
}

_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")


def is_japanese(text: str) -> bool:
    """Whether the text contains kana or kanji."""
    return bool(_JAPANESE.search(text))


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation.

    Attributes:
        text: The full training text.
        spans: Character spans ``(start, end)`` of ``text`` that are trained, in order.
        prompt: The text before the last answer (the generation prompt for it).
        reference: The last answer.
    """

    text: str
    spans: tuple[tuple[int, int], ...]
    prompt: str
    reference: str

    @property
    def trained_text(self) -> str:
        return "".join(self.text[s:e] for s, e in self.spans)


def normalize(messages: list[dict[str, Any]], *, last_role: str = "assistant") -> list[Message]:
    """Checks a conversation and returns it with canonical roles and stripped text.

    Raises DataError unless it is: an optional system message (which may declare ``tools``), then user and
    assistant turns in alternation starting with user and ending with ``last_role``, every content non-empty.
    An assistant message may carry reasoning (``reasoning_content`` or a leading ``<think>`` block, see
    aift.data.reasoning) and ``tool_calls``; then its content may be empty and the ``tool`` results follow it
    before the next assistant message (see aift.data.tools). ``last_role`` "user" also accepts tool results last.
    """
    if not messages:
        raise DataError("empty conversation")
    out = [_clean(i, message) for i, message in enumerate(messages)]
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns or turns[0]["role"] != "user" or not all(_may_follow(a, b) for a, b in itertools.pairwise(turns)):
        if any(m.get("tool_calls") or m["role"] == "tool" for m in turns):
            raise DataError(
                "turns must alternate user, assistant (after an optional system message), starting with user; "
                "an assistant message with tool_calls is followed by its tool results, and tool results only that"
            )
        raise DataError("turns must alternate user, assistant (after an optional system message), starting with user")
    last = turns[-1]["role"]
    if last != last_role and not (last_role == "user" and last == "tool"):
        raise DataError(f"the conversation must end with a message from the {last_role}")
    return out


def _may_follow(before: Message, after: Message) -> bool:
    """Whether one turn may come right after another."""
    if before["role"] == "assistant":
        return after["role"] == ("tool" if before.get("tool_calls") else "user")
    if before["role"] == "tool":
        return after["role"] in ("tool", "assistant")
    return before["role"] == "user" and after["role"] == "assistant"


def _clean(i: int, message: dict[str, Any]) -> Message:
    """One message with its canonical role, stripped content and the fields of its role."""
    role = ROLE_ALIASES.get(str(message.get("role", "")).lower())
    where = f"message {i + 1} ({role})"
    if role is None:
        raise DataError(
            f"message {i + 1}: unknown role {message.get('role')!r} (expected system, user, assistant, tool)"
        )
    content = message.get("content")
    if role == "tool":
        ids = {k: message[k] for k in ("tool_call_id", "name") if isinstance(message.get(k), str)}
        return {"role": "tool", "content": tool_result(content, where), **ids}
    if content is not None and not isinstance(content, str):
        raise DataError(f"{where}: content is a {type(content).__name__}, expected a string")
    content = (content or "").strip()
    if role == "assistant":
        return _assistant(content, message, where)
    tools = parse_tools(message.get("tools"), f"{where}: tools") if role == "system" else []
    if not content and not tools:
        raise DataError(f"{where} has no content")
    clean: Message = {"role": role, "content": content}
    if tools:
        clean["tools"] = tools
    if role == "user" and isinstance(message.get("input"), str) and message["input"].strip():
        clean["input"] = message["input"].strip()
    return clean


def _assistant(content: str, message: dict[str, Any], where: str) -> Message:
    reasoning, content = split_thinking(content, message.get("reasoning_content"), where)
    calls = parse_tool_calls(message.get("tool_calls"), where)
    if not content and not calls:
        if reasoning is not None:
            raise ThinkingOnly(f"{where}: the answer is only thinking ({OPEN}...{CLOSE}), with no text after it")
        raise DataError(f"{where} has no content")
    clean: Message = {"role": "assistant", "content": content}
    if reasoning:  # an empty <think></think> is no reasoning
        clean["reasoning_content"] = reasoning
    if calls:
        clean["tool_calls"] = calls
    return clean


def chat_content(message: Message) -> str:
    """A user message's content with its input appended (for formats without an input section)."""
    return f"{message['content']}\n\n{message['input']}" if message.get("input") else message["content"]


def eos_text(tokenizer, default: str = "</s>") -> str:
    """The tokenizer's end-of-sequence token as text (what most formats train after an answer)."""
    return getattr(tokenizer, "eos_token", None) or default


def _cut(text: str, stops: list[str]) -> str:
    """Text up to the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


class PromptFormat:
    """A prompt format: name, rendering with trained spans, generation prompt, answer parsing."""

    name = ""
    summary = ""

    def render(self, messages: list[dict[str, Any]], tokenizer=None) -> Rendered:
        """The training text of a conversation ending with an assistant answer, and its trained spans."""
        raise NotImplementedError

    def render_many(self, conversations: list[list[dict[str, Any]]], tokenizer=None) -> list[Rendered | DataError]:
        """``render`` of each conversation; one that cannot be rendered gives its DataError in its place."""
        out: list[Rendered | DataError] = []
        for messages in conversations:
            try:
                out.append(self.render(messages, tokenizer))
            except DataError as e:
                out.append(e)
        return out

    def generation_prompt(self, messages: list[dict[str, Any]], tokenizer=None) -> str:
        """The prompt for answering a conversation that ends with a user message."""
        raise NotImplementedError

    def end_of_turn(self, tokenizer=None, last: bool = True) -> str:
        """The marker trained after an answer."""
        return eos_text(tokenizer)

    def stop_strings(self, tokenizer=None) -> list[str]:
        """Strings at which generation stops and the answer is cut."""
        return [eos_text(tokenizer)]

    def parse_answer(self, generated: str, tokenizer=None) -> str:
        """The answer from generated text: cut at the first stop string, stripped."""
        return _cut(generated, self.stop_strings(tokenizer)).strip()
