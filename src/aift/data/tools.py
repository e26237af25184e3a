"""Tool calling in conversations: tool schemas, assistant tool calls and tool results, and aift's tool format.

A conversation declares its tools on its system message (``"tools"``: JSON schemas, OpenAI's
``{"type": "function", "function": {...}}``; a bare ``{"name", "parameters"}`` is wrapped so). An assistant
message may carry ``tool_calls`` (``{"type": "function", "function": {"name", "arguments": {...}}}``, arguments
as an object), and each such message is followed by ``tool`` messages with the results. That is the shape
Hugging Face chat templates take (``apply_chat_template(messages, tools=...)``).

A model whose chat template does not mention tools, and every other prompt format, gets the conversation
``lower``-ed into aift's tool format, the Hermes format Qwen2.5 and Qwen3 use, as plain messages:

- the system message gains the tool list: ``# Tools ... <tools>\\n{schema}\\n...</tools> ...``;
- a tool call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after the answer's text;
- the results of one call step become one user message of ``<tool_response>\\n...\\n</tool_response>`` blocks.

So the assistant's text and its tool-call JSON are trained, the schemas and the results are prompt (masked),
in any format. ``parse_calls`` reads calls back from generated text (`aift serve`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from aift.data import DataError
from aift.data.reasoning import with_thinking

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def _json(value: Any, what: str) -> Any:
    """A JSON text parsed (CSV cells and ShareGPT values hold JSON as text); other values as they are."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{what} is not valid JSON: {e}") from e


def parse_tools(value: Any, where: str = "tools") -> list[dict]:
    """A row's tool schemas as a list of ``{"type": "function", "function": {...}}``; [] for none."""
    tools = _json(value, where)
    if tools is None or tools == "":
        return []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: expected a list of JSON schemas (objects with a name), found {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools, 1):
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{where}: tool {i} has no name; expected {{'name', 'description', 'parameters'}}")
        out.append({"type": "function", "function": function})
    return out


def parse_tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant message's ``tool_calls`` (OpenAI's, or ShareGPT's ``{"name", "arguments"}`` objects) in the
    template shape, arguments parsed into an object; [] for none."""
    calls = _json(value, f"{where}: tool_calls")
    if calls is None:
        return []
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise DataError(f"{where}: tool_calls is a {type(calls).__name__}, expected a list of calls")
    out = []
    for i, call in enumerate(calls, 1):
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: tool call {i} has no function name; expected {{'name', 'arguments'}}")
        arguments = _json(function.get("arguments", {}), f"{where}: tool call {i} arguments")
        if not isinstance(arguments, dict):
            raise DataError(f"{where}: tool call {i} arguments are a {type(arguments).__name__}, expected an object")
        canonical = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            canonical["id"] = call["id"]
        out.append(canonical)
    return out


def tool_result(content: Any, where: str) -> str:
    """A tool message's content as text (a JSON value written out, as ShareGPT observations often hold one)."""
    if isinstance(content, (dict, list)):
        return json.dumps(content, ensure_ascii=False)
    if content is not None and not isinstance(content, str):
        raise DataError(f"{where}: content is a {type(content).__name__}, expected a string")
    return (content or "").strip()


def tools_text(tools: list[dict]) -> str:
    """The tool list as aift's format puts it in the system message."""
    return _TOOLS_INTRO + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + _TOOLS_OUTRO


def call_text(call: dict) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def has_structure(messages: list[dict]) -> bool:
    """Whether a conversation has tools, tool calls, tool results or reasoning (anything ``lower`` rewrites)."""
    return any(m.get("tools") or m.get("tool_calls") or m.get("reasoning_content") or m["role"] == "tool"
               for m in messages)  # fmt: skip


def lower(messages: list[dict], keep_tools: bool = False, keep_reasoning: bool = False) -> list[dict]:
    """A normalized conversation in plain system/user/assistant messages: tools, calls and results in aift's tool
    format (unless ``keep_tools``), reasoning in ``<think>`` before the answer (unless ``keep_reasoning``)."""
    out: list[dict] = []
    for message in messages:
        role = message["role"]
        if keep_tools or not has_structure([message]):
            message = message if keep_reasoning else _reasoning_inline(message)
            out.append(message)
        elif role == "system":
            system = message["content"]
            tools = tools_text(message["tools"]) if message.get("tools") else ""
            out.append({"role": "system", "content": f"{system}\n\n{tools}" if system and tools else system or tools})
        elif role == "assistant":
            calls = [call_text(c) for c in message.get("tool_calls", [])]
            text = "\n".join([message["content"], *calls] if message["content"] else calls)
            lowered = {"role": "assistant", "content": text}
            if message.get("reasoning_content"):
                lowered["reasoning_content"] = message["reasoning_content"]
            out.append(lowered if keep_reasoning else _reasoning_inline(lowered))
        else:  # tool: one user message for the results of one call step
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
    return [{k: v for k, v in m.items() if k != "_results"} for m in out]


def _reasoning_inline(message: dict) -> dict:
    if not message.get("reasoning_content"):
        return message
    rest = {k: v for k, v in message.items() if k != "reasoning_content"}
    return {**rest, "content": with_thinking(message["content"], message["reasoning_content"])}


_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(text outside the calls, calls) of generated text in aift's tool format; a block that is not a JSON
    ``{"name", "arguments"}`` object stays in the text, so nothing the model wrote is lost."""
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        try:
            parsed = parse_tool_calls([json.loads(match.group(1))], "generated text")
        except (ValueError, DataError):
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls += parsed
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def template_messages(messages: list[dict], template: str) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for a chat template: what the template handles itself (it mentions ``tools``,
    ``reasoning_content``) is kept for it, the rest lowered into aift's format; the tools come off the system
    message, which goes when it held nothing else."""
    messages = lower(messages, keep_tools="tools" in template, keep_reasoning="reasoning_content" in template)
    first = messages[0]
    if first["role"] != "system" or not first.get("tools"):
        return messages, None
    rest = messages[1:]
    system = [{"role": "system", "content": first["content"]}] if first["content"] else []
    return [*system, *rest], first["tools"]


def template_spans(text: str, messages: list[dict], prefix_of, marker: str) -> list[tuple[int, int]]:
    """The trained span of each assistant message of a template-rendered tool or reasoning conversation: from
    the end of its generation prompt (``prefix_of(k)``, the history before it) to the end-of-turn ``marker``
    after it, so its reasoning, text and tool-call JSON are trained whatever syntax the template writes."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = prefix_of(k)
        end = text.find(marker, len(prefix)) if marker and text.startswith(prefix) else -1
        answer = text[len(prefix) : end]
        if end < 0 or message["content"] not in answer:
            raise DataError(
                "the chat template renders earlier turns differently once more follows, so the trained spans "
                "cannot be located; use an explicit --format such as chatml"
            )
        if message.get("reasoning_content") and message["reasoning_content"] not in answer:
            raise DataError(
                "the chat template drops the reasoning of earlier answers (as Qwen3's does); "
                "prepare with --drop-earlier-thinking"
            )
        spans.append((len(prefix), end + len(marker)))
    return spans
