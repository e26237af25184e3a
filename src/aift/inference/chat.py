"""A multi-turn terminal chat: history kept between turns, /reset clears it, /exit (or Ctrl-D) leaves."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from aift.inference.runner import GenerationSettings, LoadedModel, stream_answer

HELP = "Type a message and press Enter. /history shows the conversation, /reset forgets it, /exit quits."


class ChatSession:
    """The conversation so far and one method to add a turn."""

    def __init__(self, loaded: LoadedModel, settings: GenerationSettings | None = None):
        self.loaded = loaded
        self.settings = settings or GenerationSettings()
        self.history: list[dict] = []

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answers a user message in the context of the history and appends both."""
        messages = [*self.history, {"role": "user", "content": text}]
        answer = stream_answer(self.loaded, messages, self.settings, on_text)
        # An empty answer cannot go into the history (formats reject empty turns): keep a placeholder.
        self.history = [*messages, {"role": "assistant", "content": answer or "..."}]
        return answer

    def reset(self) -> None:
        self.history = []


def run_chat(
    session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout, user_prompt: str = "you> "
) -> int:
    """The read-answer loop; returns the number of turns answered."""
    out.write(f"aift chat with {session.loaded.name} (format: {session.loaded.prompt_format.name}). {HELP}\n")
    out.flush()
    turns = 0
    while True:
        try:
            text = read(user_prompt).strip()
        except EOFError:
            out.write("\n")
            break
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/history":
            _show_history(session, out)
            continue
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            out.flush()
            continue
        out.write("assistant> ")
        out.flush()
        session.ask(text, on_text=lambda piece: (out.write(piece), out.flush()))
        out.write("\n")
        out.flush()
        turns += 1
    out.write("bye\n")
    out.flush()
    return turns


def _show_history(session: ChatSession, out: TextIO) -> None:
    out.write(f"({len(session.history)} messages in the conversation)\n")
    for message in session.history:
        out.write(f"  {message['role']}: {message['content']}\n")
    out.flush()
