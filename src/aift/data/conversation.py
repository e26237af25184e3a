"""A conversation and what a prompt format makes of it: the interface every format implements.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``: an
optional system message first, then user and assistant turns in alternation (``normalize`` checks it and
gives the canonical roles). A ``PromptFormat`` renders it into the training text and the character spans
that are trained (``Rendered``); the formats themselves and the choice of one are in aift.data.formats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aift.data import DataError

Message = dict[str, str]

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

    Raises DataError unless it is: an optional system message, then user/assistant turns in
    alternation starting with user and ending with ``last_role``, every content non-empty.
    """
    if not messages:
        raise DataError("empty conversation")
    out: list[Message] = []
    for i, message in enumerate(messages):
        role = ROLE_ALIASES.get(str(message.get("role", "")).lower())
        content = message.get("content")
        if role is None:
            raise DataError(f"message {i + 1}: unknown role {message.get('role')!r} (expected system, user, assistant)")
        if content is not None and not isinstance(content, str):
            kind = type(content).__name__
            raise DataError(f"message {i + 1} ({role}): content is a {kind}, expected a string")
        if not content or not content.strip():
            raise DataError(f"message {i + 1} ({role}) has no content")
        clean = {"role": role, "content": content.strip()}
        if role == "user" and isinstance(message.get("input"), str) and message["input"].strip():
            clean["input"] = message["input"].strip()
        out.append(clean)
    turns = out[1:] if out[0]["role"] == "system" else out
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or [m["role"] for m in turns] != expected[: len(turns)]:
        raise DataError("turns must alternate user, assistant (after an optional system message), starting with user")
    if turns[-1]["role"] != last_role:
        raise DataError(f"the conversation must end with a message from the {last_role}")
    return out


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
