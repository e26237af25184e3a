"""Prompt formats: a conversation -> the training text and the character spans that are trained.

A conversation (aift.data.conversation) is a list of messages: an optional system message first, then user
and assistant turns in alternation. A user message may carry ``"input"`` (the alpaca/dolly context), which
formats with an input section (alpaca, stablelm-ja) show apart and the others append to the content.

Every format gives three things:

- ``render(messages)``: the full training text and the trained spans (each assistant answer plus the
  end-of-turn marker after it); ``prompt`` is the text before the last answer, exactly what
  ``generation_prompt`` returns for the same history, so training and inference see the same prompt.
- ``generation_prompt(history)``: history (ending with a user turn) plus the opening of the answer.
- ``parse_answer(generated)``: the answer from generated text (cut at the end markers, rinna ``<NL>``
  turned back into newlines).

``resolve_format`` picks the format for a model: stored with a fine-tuned model, registered, the
tokenizer's chat template, or (for models with none) alpaca, in its Japanese variant for Japanese rows.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from aift.data import DataError
from aift.data.conversation import Message, PromptFormat, Rendered, chat_content, eos_text, is_japanese, normalize
from aift.data.prepared import PREPARE_JSON
from aift.data.tools import has_structure, lower, template_messages, template_spans
from aift.models.run_folder import META_FILE, SUMMARY_FILE
from aift.utils.files import FileFormatError, read_json_object

log = logging.getLogger(__name__)

# Default system prompts from the model cards that give one (used when the data has no system message).
DEFAULT_SYSTEM = {
    "elyza/Llama-3-ELYZA-JP-8B": "あなたは誠実で優秀な日本人のアシスタントです。特に指示が無い場合は、常に日本語で回答してください。",
}


class _TurnFormat(PromptFormat):
    """A format written as plain strings; subclasses give the pieces around each turn."""

    def system_text(self, system: str | None, first_user: Message) -> str:
        """The text before the first user turn."""
        return ""

    def user_text(self, message: Message, first: bool, system: str | None) -> str:
        """A user turn up to and including the opening of the answer."""
        raise NotImplementedError

    def answer_text(self, content: str) -> str:
        return content

    def after_answer(self, last: bool) -> str:
        """Untrained text after the end-of-turn marker."""
        return ""

    def _segments(self, msgs: list[Message], tokenizer) -> list[tuple[str, str]]:
        """(text, kind) pieces, kind one of prompt / answer / end."""
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        turns = msgs[1:] if system is not None else msgs
        segments = [(self.system_text(system, turns[0]), "prompt")]
        for i, message in enumerate(turns):
            if message["role"] == "user":
                segments.append((self.user_text(message, i == 0, system), "prompt"))
                continue
            last = i == len(turns) - 1
            segments.append((self.answer_text(message["content"]), "answer"))
            segments.append((self.end_of_turn(tokenizer, last), "end"))
            segments.append((self.after_answer(last), "prompt"))
        return segments

    def render(self, messages, tokenizer=None) -> Rendered:
        msgs = lower(normalize(messages))  # tools and reasoning in aift's format (aift.data.tools)
        text, spans, prompt_end = "", [], 0
        for piece, kind in self._segments(msgs, tokenizer):
            if kind == "answer":
                prompt_end = len(text)
            if kind != "prompt" and piece:
                if spans and spans[-1][1] == len(text):
                    spans[-1] = (spans[-1][0], len(text) + len(piece))
                else:
                    spans.append((len(text), len(text) + len(piece)))
            text += piece
        return Rendered(text, tuple(spans), text[:prompt_end], msgs[-1]["content"])

    def generation_prompt(self, messages, tokenizer=None) -> str:
        msgs = lower(normalize(messages, last_role="user")) + [{"role": "assistant", "content": ""}]
        segments = self._segments(msgs, tokenizer)
        last_answer = max(i for i, (_, kind) in enumerate(segments) if kind == "answer")
        return "".join(piece for piece, _ in segments[:last_answer])


_ALPACA = {
    "en": {
        "preamble": "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.",
        "preamble_input": "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.",
        "instruction": "### Instruction:",
        "input": "### Input:",
        "response": "### Response:",
    },
    "ja": {
        # No preamble: the Japanese variant starts at "### 指示:" (aift's JapaneseModel prompt since its start).
        "preamble": "",
        "preamble_input": "",
        "instruction": "### 指示:",
        "input": "### 入力:",
        "response": "### 応答:",
    },
}


class AlpacaFormat(_TurnFormat):
    """Stanford Alpaca; for Japanese user text the Japanese variant (### 指示: / ### 入力: / ### 応答:, no preamble)."""

    name = "alpaca"
    summary = "Stanford Alpaca (### Instruction/Input/Response; ### 指示/入力/応答 for Japanese rows)"

    @staticmethod
    def _words(message: Message) -> dict[str, str]:
        # Decided from the user's side only, so a generation prompt gets the variant its training text had.
        return _ALPACA["ja" if is_japanese(chat_content(message)) else "en"]

    def system_text(self, system, first_user):
        words = self._words(first_user)
        preamble = system or words["preamble_input" if first_user.get("input") else "preamble"]
        return f"{preamble}\n\n" if preamble else ""

    def user_text(self, message, first, system):
        words = self._words(message)
        text = f"{words['instruction']}\n{message['content']}\n\n"
        if message.get("input"):
            text += f"{words['input']}\n{message['input']}\n\n"
        return text + f"{words['response']}\n"

    def after_answer(self, last):
        return "" if last else "\n\n"

    def stop_strings(self, tokenizer=None):
        return [eos_text(tokenizer), "\n\n### Instruction:", "\n\n### 指示:", "\n### Instruction:", "\n### 指示:"]


class ChatMLFormat(_TurnFormat):
    name = "chatml"
    summary = "ChatML: <|im_start|>role\\n...<|im_end|>\\n"

    def system_text(self, system, first_user):
        return f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""

    def user_text(self, message, first, system):
        return f"<|im_start|>user\n{chat_content(message)}<|im_end|>\n<|im_start|>assistant\n"

    def end_of_turn(self, tokenizer=None, last=True):
        return "<|im_end|>"

    def after_answer(self, last):
        return "\n"

    def stop_strings(self, tokenizer=None):
        return ["<|im_end|>", "<|im_start|>", eos_text(tokenizer)]


class Llama2Format(_TurnFormat):
    name = "llama2"
    summary = "Llama 2 chat: <s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST] ... </s>"

    def user_text(self, message, first, system):
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else ""
        return f"<s>[INST] {sys_block}{chat_content(message)} [/INST]"

    def answer_text(self, content):
        # The space after [/INST] belongs to the answer's first token in Llama's tokenizer.
        return f" {content}"

    def end_of_turn(self, tokenizer=None, last=True):
        return " </s>"

    def stop_strings(self, tokenizer=None):
        return ["</s>", "[INST]", eos_text(tokenizer)]


class StableLMJaFormat(_TurnFormat):
    """japanese-stablelm-3b-4e1t-instruct, as its model card builds prompts."""

    name = "stablelm-ja"
    summary = "Japanese StableLM instruct: system line, then \\n\\n### 指示: \\n / 入力: \\n / 応答: \\n"
    SYSTEM = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"

    def system_text(self, system, first_user):
        return system or self.SYSTEM

    def user_text(self, message, first, system):
        text = f"\n\n### 指示: \n{message['content']}"
        if message.get("input"):
            text += f"\n\n### 入力: \n{message['input']}"
        return text + "\n\n### 応答: \n"

    def stop_strings(self, tokenizer=None):
        return [eos_text(tokenizer), "\n\n### 指示:"]


class RinnaFormat(_TurnFormat):
    """rinna japanese-gpt-neox instruction-sft: ``ユーザー: ...<NL>システム: ...``; newlines become ``<NL>``."""

    name = "rinna"
    summary = "rinna: ユーザー: ...<NL>システム: ... (newlines as <NL>)"

    @staticmethod
    def escape(text: str) -> str:
        return text.replace("\r\n", "\n").replace("\n", "<NL>")

    def system_text(self, system, first_user):
        return f"{self.escape(system)}<NL>" if system else ""

    def user_text(self, message, first, system):
        return f"ユーザー: {self.escape(chat_content(message))}<NL>システム: "

    def answer_text(self, content):
        return self.escape(content)

    def end_of_turn(self, tokenizer=None, last=True):
        # Within a dialogue the model card joins utterances with <NL>; the final answer ends with EOS.
        return eos_text(tokenizer) if last else "<NL>"

    def stop_strings(self, tokenizer=None):
        return [eos_text(tokenizer), "<NL>ユーザー:", "<NL>システム:"]

    def parse_answer(self, generated, tokenizer=None):
        return super().parse_answer(generated, tokenizer).replace("<NL>", "\n").strip()


class UserAssistantFormat(_TurnFormat):
    name = "user-assistant"
    summary = "<|user|>...<|endoftext|>\\n<|assistant|>...<|endoftext|>"

    def system_text(self, system, first_user):
        return f"<|system|>{system}<|endoftext|>\n" if system else ""

    def user_text(self, message, first, system):
        return f"<|user|>{chat_content(message)}<|endoftext|>\n<|assistant|>"

    def end_of_turn(self, tokenizer=None, last=True):
        return "<|endoftext|>"

    def after_answer(self, last):
        return "" if last else "\n"

    def stop_strings(self, tokenizer=None):
        return ["<|endoftext|>", "<|user|>", eos_text(tokenizer)]

    _TURN = re.compile(
        r"<\|(system|user|assistant)\|>(.*?)(?:<\|endoftext\|>|(?=<\|(?:system|user|assistant)\|>)|$)", re.S
    )

    def parse_conversation(self, text: str) -> list[Message]:
        """The conversation in a ``<|user|>...<|endoftext|>\\n<|assistant|>...<|endoftext|>`` string."""
        messages = [{"role": role, "content": content.strip()} for role, content in self._TURN.findall(text)]
        if not messages:
            raise DataError("no <|user|>/<|assistant|> turns in the text")
        return normalize(messages)


class CompletionFormat(_TurnFormat):
    """Plain text for base models: the prompt, a newline, the answer and EOS."""

    name = "completion"
    summary = "plain text: prompt\\nanswer<eos> (base models)"

    def system_text(self, system, first_user):
        return f"{system}\n\n" if system else ""

    def user_text(self, message, first, system):
        return f"{chat_content(message)}\n"

    def after_answer(self, last):
        return "" if last else "\n"


class TemplateFormat(PromptFormat):
    """The tokenizer's own chat template (apply_chat_template); spans found by rendering each history prefix."""

    name = "template"
    summary = "the tokenizer's own chat template (apply_chat_template)"

    @staticmethod
    def _check(tokenizer):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "format 'template' needs a tokenizer with a chat template, and this one has none; "
                f"choose another --format ({', '.join(n for n in FORMATS if n != 'template')})"
            )
        return tokenizer

    @staticmethod
    def _chat(msgs: list[Message], tok) -> tuple[list[Message], list | None]:
        """(messages, tools) for the template: tools and reasoning kept where it handles them, else lowered."""
        chat = [{**{k: v for k, v in m.items() if k != "input"}, "content": chat_content(m)} for m in msgs]
        return template_messages(chat, tok.chat_template if isinstance(tok.chat_template, str) else "")

    def render(self, messages, tokenizer=None) -> Rendered:
        tok = self._check(tokenizer)
        msgs, tools = self._chat(normalize(messages), tok)
        if tools or has_structure(msgs):  # the template writes the tool calls or reasoning itself
            return self._render_structured(msgs, tools, tok)
        text = _apply_template(tok, msgs)
        answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        prefixes = [_apply_template(tok, msgs[:k], add_generation_prompt=True) for k in answers]
        return self._located(msgs, text, dict(zip(answers, prefixes, strict=True)), tok)

    def render_many(self, conversations, tokenizer=None) -> list[Rendered | DataError]:
        """``render`` of many conversations with two batched calls of the chat template (the texts, then every
        history prefix), instead of one call per text and prefix; the results are the same. If any conversation
        fails (bad shape, a template that refuses it), each is rendered alone, so that only that one fails."""
        tok = self._check(tokenizer)
        try:
            prepared = [self._chat(normalize(m), tok) for m in conversations]
            if any(tools or has_structure(msgs) for msgs, tools in prepared):
                return super().render_many(conversations, tokenizer)
            chats = [msgs for msgs, _ in prepared]
            texts = _apply_template(tok, chats) if chats else []
            wanted = [(i, k) for i, msgs in enumerate(chats) for k, m in enumerate(msgs) if m["role"] == "assistant"]
            histories = [chats[i][:k] for i, k in wanted]
            rendered = _apply_template(tok, histories, add_generation_prompt=True) if histories else []
            prefixes: list[dict[int, str]] = [{} for _ in chats]
            for (i, k), prefix in zip(wanted, rendered, strict=True):
                prefixes[i][k] = prefix
            return [self._located(m, t, p, tok) for m, t, p in zip(chats, texts, prefixes, strict=True)]
        except DataError:
            return super().render_many(conversations, tokenizer)

    def _render_structured(self, msgs: list[Message], tools: list | None, tok) -> Rendered:
        """A conversation with tool calls or reasoning the template renders itself, one template call a prefix."""
        text = _apply_template(tok, msgs, tools=tools)
        prefix = lambda k: _apply_template(tok, msgs[:k], add_generation_prompt=True, tools=tools)  # noqa: E731
        marker = self.end_of_turn(tok)
        spans = template_spans(text, msgs, prefix, marker)
        (start, end) = spans[-1]
        return Rendered(text, tuple(spans), text[:start], text[start:end].removesuffix(marker).strip())

    def _located(self, msgs: list[Message], text: str, prefixes: dict[int, str], tok) -> Rendered:
        """The rendered text with each answer's span, found after the history prefix rendered before it."""
        spans, prompt_end = [], 0
        for k, message in enumerate(msgs):
            if message["role"] != "assistant":
                continue
            prefix = prefixes[k]
            start = text.find(message["content"], len(prefix)) if text.startswith(prefix) else -1
            if start < 0:
                raise DataError(
                    "the chat template renders earlier turns differently once an answer follows (for example it "
                    "drops reasoning from history), so the trained spans cannot be located; use an explicit "
                    "--format such as chatml"
                )
            end = start + len(message["content"])
            spans.append((start, end + len(self._marker_after(text, end, tok))))
            prompt_end = start
        return Rendered(text, tuple(spans), text[:prompt_end], msgs[-1]["content"])

    @staticmethod
    def _marker_after(text: str, pos: int, tokenizer) -> str:
        """The special token right after an answer (spaces allowed before it), or ''."""
        rest = text[pos:]
        gap = len(rest) - len(rest.lstrip(" "))
        for token in sorted(_special_tokens(tokenizer), key=len, reverse=True):
            if rest.startswith(token, gap):
                return rest[: gap + len(token)]
        return ""

    def generation_prompt(self, messages, tokenizer=None) -> str:
        tok = self._check(tokenizer)
        msgs, tools = self._chat(normalize(messages, last_role="user"), tok)
        return _apply_template(tok, msgs, add_generation_prompt=True, tools=tools)

    def end_of_turn(self, tokenizer=None, last=True):
        """The special token the template puts after an answer (found by rendering a probe), or ''."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        return self.render(probe, tokenizer).trained_text.removeprefix("Hello")

    def stop_strings(self, tokenizer=None):
        return [eos_text(tokenizer), *_special_tokens(tokenizer)]


def _apply_template(tokenizer, messages: list, add_generation_prompt: bool = False, tools: list | None = None) -> Any:
    """apply_chat_template of one conversation (a string) or of a list of them (a list); a template that
    refuses a conversation (raise_exception) is a DataError."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        batched = bool(messages) and isinstance(messages[0], list)
        roles = "several conversations" if batched else ", ".join(m["role"] for m in messages)
        raise DataError(f"the tokenizer's chat template refuses this conversation ({roles}): {e}") from e


def _special_tokens(tokenizer) -> list[str]:
    if tokenizer is None:
        return []
    return [t for t in dict.fromkeys([tokenizer.eos_token, *tokenizer.all_special_tokens]) if t]


FORMATS: dict[str, PromptFormat] = {
    f.name: f
    for f in (
        AlpacaFormat(),
        ChatMLFormat(),
        Llama2Format(),
        TemplateFormat(),
        StableLMJaFormat(),
        RinnaFormat(),
        UserAssistantFormat(),
        CompletionFormat(),
    )
}
FORMAT_CHOICES = ("auto", *FORMATS)


def get_format(name: str) -> PromptFormat:
    """The format registered under a name; DataError listing the valid names otherwise."""
    if name not in FORMATS:
        raise DataError(f"unknown format {name!r}; valid formats: {', '.join(FORMAT_CHOICES)}")
    return FORMATS[name]


def stored_format(model: str | Path) -> str | None:
    """The format a fine-tuned model or prepared dataset folder was made with (aift_meta.json, prepare.json,
    train_summary.json), or None."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    for name, key in ((META_FILE, "prompt_format"), (SUMMARY_FILE, "prompt_format"), (PREPARE_JSON, "format")):
        path = folder / name
        if path.is_file():
            try:
                value = read_json_object(path).get(key)
            except (OSError, FileFormatError):
                continue
            if value in FORMATS:
                return value
    return None


def resolve_format(model_name: str | Path, tokenizer=None, requested: str | None = "auto") -> PromptFormat:
    """The format to use for a model.

    ``auto`` takes the format stored with a fine-tuned model, else the registered one, else the
    tokenizer's chat template, else alpaca (Japanese variant for Japanese rows). An explicit format is
    used as asked, with a warning when it differs from the stored, registered or template format.

    Args:
        model_name: Registry name, hub id or local folder.
        tokenizer: The model's tokenizer (for its chat template), or None.
        requested: ``auto`` (or None) or a format name.

    Returns:
        The PromptFormat.
    """
    from aift.models.registry import get_spec

    stored = stored_format(model_name)
    spec = get_spec(str(model_name))
    registered = spec.prompt_format if spec and spec.prompt_format in FORMATS else None
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested in (None, "", "auto"):
        fmt = get_format(stored or registered or ("template" if has_template else "alpaca"))
        if fmt.name == "template" and tokenizer is not None:
            TemplateFormat._check(tokenizer)  # fail now, not on every row
        return fmt
    fmt = get_format(requested)
    if requested == "template" and tokenizer is not None:
        TemplateFormat._check(tokenizer)
    if stored and stored != requested:
        log.warning(
            "warning: %s was trained with format %r but format %r was asked for; using %r",
            model_name,
            stored,
            requested,
            requested,
        )
    elif registered and registered != requested:
        log.warning("warning: %s is registered with format %r; using %r as asked", model_name, registered, requested)
    elif has_template and requested != "template":
        log.warning(
            "warning: %s has its own chat template (format 'template'); using %r as asked", model_name, requested
        )
    return fmt


def default_system(model_name: str | Path) -> str | None:
    """The model card's default system prompt, where it gives one."""
    from aift.models.registry import get_spec

    spec = get_spec(str(model_name))
    return DEFAULT_SYSTEM.get(spec.name) if spec else None
