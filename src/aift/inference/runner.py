"""Loading any model aift makes (base + adapter, merged, quantized) and answering in its prompt format, streaming.

loaded = load_for_inference("runs/ja-lora/final")          # adapter folder: base read from it
answer = stream_answer(loaded, [{"role": "user", "content": "日本の首都は?"}], on_text=print)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from aift.data.conversation import PromptFormat
from aift.data.formats import default_system, resolve_format, stored_format

log = logging.getLogger(__name__)

# Shown while streaming: markers that end an answer or become something else (rinna's <NL>).
_EXTRA_MARKERS = ("<NL>",)


@dataclass
class LoadedModel:
    """A model ready for generation, with the prompt format it was trained in."""

    model: Any
    tokenizer: Any
    prompt_format: PromptFormat
    name: str
    system: str | None = None


@dataclass
class GenerationSettings:
    """Sampling settings (greedy ignores temperature, top_p and top_k)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    greedy: bool = False
    extra: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        if self.greedy or self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, **self.extra}
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return {"do_sample": True, "max_new_tokens": self.max_new_tokens, **sampling, **self.extra}


def load_for_inference(
    model: str,
    adapter: str | None = None,
    device: str | None = None,
    prompt_format: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Loads a base model (+ adapter), a run dir, a merged folder, a quantized folder or an adapter folder alone.

    The prompt format comes from the adapter's or model's aift_meta.json when training stored one, else
    the registry, else the tokenizer's chat template, else alpaca (see aift.data.formats.resolve_format).
    An adapter on an unquantized base is merged into it (same outputs, faster generation).
    """
    from aift.models.run_folder import open_run

    run = open_run(model, adapter, device=device, merge=True, trust_remote_code=trust_remote_code)
    target = run.target
    fmt_source = target.folder if target.folder and stored_format(target.folder) else target.base
    fmt = resolve_format(fmt_source, run.tokenizer, prompt_format)
    log.info("prompt format: %s", fmt.name)
    return LoadedModel(run.model, run.tokenizer, fmt, target.folder or target.base, default_system(target.base))


def build_prompt(loaded: LoadedModel, messages: list[dict]) -> str:
    """The generation prompt for a history ending with a user message (system prompt added when the card has one)."""
    if loaded.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": loaded.system}, *messages]
    return loaded.prompt_format.generation_prompt(messages, loaded.tokenizer)


def _held_back(text: str, markers: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a marker (not shown yet)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker), len(text)), 0, -1):
            if marker.startswith(text[-n:]):
                longest = max(longest, n)
                break
    return longest


class _AnswerStream:
    """Turns raw generated text into the answer as it grows, calling on_text with each new piece."""

    def __init__(self, loaded: LoadedModel, on_text: Callable[[str], None] | None):
        self.fmt, self.tokenizer, self.on_text = loaded.prompt_format, loaded.tokenizer, on_text
        self.markers = [*self.fmt.stop_strings(self.tokenizer), *_EXTRA_MARKERS]
        self.raw, self.shown = "", ""

    def feed(self, piece: str) -> None:
        self.raw += piece
        safe = self.raw[: len(self.raw) - _held_back(self.raw, self.markers)]
        self._show(self.fmt.parse_answer(safe, self.tokenizer))

    def finish(self) -> str:
        answer = self.fmt.parse_answer(self.raw, self.tokenizer)
        self._show(answer)
        return answer

    def _show(self, answer: str) -> None:
        # parse_answer strips, so a later answer extends an earlier one; anything else waits for the end.
        if answer.startswith(self.shown) and len(answer) > len(self.shown):
            if self.on_text:
                self.on_text(answer[len(self.shown) :])
            self.shown = answer


@torch.inference_mode()
def stream_answer(
    loaded: LoadedModel,
    messages: list[dict],
    settings: GenerationSettings | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generates the answer to a history ending with a user message; on_text gets each new piece as it is made.

    Returns:
        The whole answer (cut at the format's end markers).
    """
    from transformers import TextIteratorStreamer

    settings = settings or GenerationSettings()
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt = build_prompt(loaded, messages)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False)
    kwargs = {
        **inputs,
        **settings.kwargs(),
        "streamer": streamer,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_strings": [s for s in loaded.prompt_format.stop_strings(tokenizer) if s],
        "tokenizer": tokenizer,
    }
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    answer = _AnswerStream(loaded, on_text)
    for piece in streamer:
        answer.feed(piece)
    thread.join()
    if errors:
        raise errors[0]
    return answer.finish()
