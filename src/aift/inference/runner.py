"""Loading any model aift makes (base + adapter, merged, quantized) and answering in its prompt format, streaming.

loaded = load_for_inference("runs/ja-lora/final")          # adapter folder: base read from it
answer = stream_answer(loaded, [{"role": "user", "content": "日本の首都は?"}], on_text=print)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from aift.data.conversation import PromptFormat
from aift.data.formats import default_system, resolve_format, stored_format
from aift.inference.generation import SamplingParams, eos_token_ids, generate_batch

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

    def params(self, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """The token-level sampling these settings mean (temperature 0 is greedy)."""
        temperature = 0.0 if self.greedy else max(self.temperature, 0.0)
        return SamplingParams(self.max_new_tokens, temperature, self.top_p, self.top_k, stop_token_ids)


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


class _TokenText:
    """The text of tokens as they arrive, one new piece per token (empty while a multi-byte character is spelled
    out by byte tokens). Special tokens are kept: the format's parse_answer cuts at them."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.text = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


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
    settings = settings or GenerationSettings()
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = tokenizer(build_prompt(loaded, messages), add_special_tokens=False)["input_ids"]
    stops = [s for s in loaded.prompt_format.stop_strings(tokenizer) if s]
    answer, text = _AnswerStream(loaded, on_text), _TokenText(tokenizer)

    def on_token(_: int, token: int) -> bool:
        answer.feed(text.add(token))
        return any(stop in answer.raw for stop in stops)  # the format's end marker: the answer is complete

    params = settings.params(eos_token_ids(model, tokenizer))
    generate_batch(model, [ids], params, pad_token_id=_pad_id(tokenizer), on_token=on_token)
    return answer.finish()


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
