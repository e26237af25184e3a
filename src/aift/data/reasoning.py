"""Reasoning traces: ``<think>...</think>`` spans or a ``reasoning_content`` field on assistant messages.

A conversation keeps an answer's reasoning in ``reasoning_content`` (the field OpenAI-style APIs, DeepSeek and
Qwen3's chat template use); a ``<think>`` block at the start of the content is moved there when the row has no
such field. An empty ``<think></think>`` is no reasoning at all, and an answer that is nothing but reasoning is
not an answer (``ThinkingOnly``: `aift prepare` drops and counts such rows).

Formats without their own place for reasoning get it back in the content as Qwen3 writes it
(``<think>\\n...\\n</think>\\n\\n`` before the answer), so it is trained with the answer. ``drop_earlier_thinking``
removes it from the answers before the last user message, as Qwen3's template does at inference.
"""

from __future__ import annotations

from typing import Any

from aift.data import DataError

OPEN, CLOSE = "<think>", "</think>"


class ThinkingOnly(DataError):
    """An assistant message whose only content is its reasoning (or an empty ``<think></think>``)."""


def split_thinking(content: str, field: Any, where: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant message: reasoning None when it has none, '' for an empty block.

    ``field`` is the message's ``reasoning_content``; when it is absent or null, a ``<think>`` block leading the
    content is taken (also one whose ``<think>`` the chat template had written, so only ``</think>`` is there).
    """
    if field is not None:
        if not isinstance(field, str):
            raise DataError(f"{where}: reasoning_content is a {type(field).__name__}, expected a string")
        return field.strip(), content
    if CLOSE not in content:
        if content.lstrip().startswith(OPEN):
            raise DataError(f"{where}: {OPEN} is not closed by {CLOSE}")
        return None, content
    before, _, after = content.partition(CLOSE)
    before = before.strip()
    if before.startswith(OPEN):
        before = before[len(OPEN) :]
    elif OPEN in before:  # text before the block: not a leading reasoning trace
        raise DataError(f"{where}: text before {OPEN}; expected the reasoning first, then the answer")
    return before.strip(), after.strip()


def with_thinking(content: str, reasoning: str | None) -> str:
    """The answer with its reasoning in front, as Qwen3's template writes it (the answer alone without reasoning)."""
    return f"{OPEN}\n{reasoning}\n{CLOSE}\n\n{content}" if reasoning else content


def drop_earlier_thinking(messages: list[dict]) -> list[dict]:
    """The conversation without the reasoning of the answers before its last user message."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last_user = users[-1] if users else len(messages)
    return [
        {k: v for k, v in m.items() if k != "reasoning_content"} if i < last_user else m for i, m in enumerate(messages)
    ]


def thinking_runs(runs: list[tuple[str, bool]]) -> list[tuple[str, bool, bool]]:
    """Decoded (text, trained) runs split at the think tags: (text, trained, inside a ``<think>`` block, tags
    included), for showing the reasoning in its own colour."""
    out: list[tuple[str, bool, bool]] = []
    inside = False
    for text, trained in runs:
        rest = text
        while rest:
            at = rest.find(CLOSE if inside else OPEN)
            if at < 0:
                out.append((rest, trained, inside))
                break
            cut = at + len(CLOSE) if inside else at  # the tags belong to the reasoning
            out.append((rest[:cut], trained, inside))
            rest, inside = rest[cut:], not inside
    return [run for run in out if run[0]]
