"""Reward functions for GRPO, with TRL's interface, and the checks that make a broken one stop the run clearly.

A reward function is called once per step on all of this process's completions::

    f(prompts, completions, completion_ids=..., trainer_state=..., **columns) -> list[float | None]

``prompts`` and ``completions`` are strings for text data and message lists (``[{"role": "assistant",
"content": ...}]``) for conversational data; ``completion_ids`` the generated token ids; ``trainer_state`` an
object with ``global_step``, ``epoch`` and ``max_steps``; every other column of the source rows (``reference``
at least) arrives as a keyword argument holding one value per completion (a prompt's value repeated for each of
its completions). A ``None`` leaves that function out for that completion. So a TRL user's reward file runs
unchanged (``--reward python:rewards.py:my_reward``).

Built-in rewards (``--reward SPEC``):

- ``exact_match``: 1.0 when the completion equals the ``reference`` column after both are normalised (Unicode
  NFKC, then every run of whitespace made one space and the ends stripped), else 0.0. A list of references
  matches any of them; a missing (None) reference gives None.
- ``format:REGEX``: 1.0 when ``re.fullmatch(REGEX, completion.strip())``, else 0.0 (the completion's leading and
  trailing whitespace, e.g. the newline a chat model emits before EOS, is stripped; ``(?s)`` lets ``.`` match
  newlines).
- ``length[:CHARS]``: 0.0 up to CHARS characters (default 200), then ``-min(1, (len - CHARS) / CHARS)``: -1 at
  twice the target and beyond, so it never outweighs a 0/1 reward by more than its weight.
- ``ja``: the share of Japanese characters among the completion's non-whitespace characters (0.0 when it has
  none), counting hiragana U+3040-309F, katakana U+30A0-30FF and U+31F0-31FF, half-width katakana U+FF66-FF9F,
  kanji U+4E00-9FFF, U+3400-4DBF and U+F900-FAFF, and Japanese punctuation U+3001-303F (、。「」々〆 ...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aift.config import ConfigError
from aift.errors import AiftError

RewardFunc = Callable[..., Sequence[Any]]
DEFAULT_LENGTH_TARGET = 200
BUILTINS = ("exact_match", "format", "length", "ja")


class RewardError(AiftError):
    """A reward function failed: the message names the function, the step and the sample."""


@dataclass(frozen=True)
class RewardState:
    """What a reward function gets as ``trainer_state`` (the fields of TRL's TrainerState that rewards read)."""

    global_step: int
    epoch: float = 0.0
    max_steps: int = -1


@dataclass(frozen=True)
class Reward:
    """One reward function and the name its metrics are logged under (``rewards/<name>``)."""

    name: str
    func: RewardFunc
    spec: str


# ---------------------------------------------------------------------- built-ins


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion: itself, or the contents of its messages (text parts of content lists) joined."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:  # a list of content blocks
            parts.extend(block.get("text", "") for block in content if block.get("type", "text") == "text")
    return "".join(parts)


def normalize_answer(text: str) -> str:
    """NFKC, then whitespace runs collapsed to one space and the ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def exact_match(prompts, completions, reference=None, **kwargs) -> list[float | None]:
    """1.0 when the normalised completion equals the normalised ``reference`` (or one of a list of them)."""
    if reference is None:
        raise ValueError("exact_match needs a `reference` column in the data (the expected answer of each prompt)")
    out: list[float | None] = []
    for completion, ref in zip(completions, reference, strict=True):
        if ref is None:
            out.append(None)
            continue
        refs = [ref] if isinstance(ref, str) else list(ref)
        got = normalize_answer(completion_text(completion))
        out.append(1.0 if any(got == normalize_answer(str(r)) for r in refs) else 0.0)
    return out


def format_reward(pattern: str) -> RewardFunc:
    """1.0 when the stripped completion fully matches ``pattern``, else 0.0."""
    regex = re.compile(pattern)

    def format_match(prompts, completions, **kwargs) -> list[float]:
        return [1.0 if regex.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    return format_match


def length_penalty(target: int = DEFAULT_LENGTH_TARGET) -> RewardFunc:
    """0 up to ``target`` characters, then -min(1, (len - target) / target)."""

    def length(prompts, completions, **kwargs) -> list[float]:
        over = [max(0, len(completion_text(c)) - target) for c in completions]
        return [-min(1.0, n / target) for n in over]

    return length


_JAPANESE_RANGES = (
    (0x3001, 0x303F),  # Japanese punctuation and marks: 、。「」々〆〜
    (0x3040, 0x309F),  # hiragana
    (0x30A0, 0x30FF),  # katakana (with ー)
    (0x31F0, 0x31FF),  # katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs (kanji)
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width katakana
)


def is_japanese_char(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _JAPANESE_RANGES)


def japanese_share(prompts, completions, **kwargs) -> list[float]:
    """Share of Japanese characters among the non-whitespace characters of each completion (0.0 if none)."""
    out = []
    for completion in completions:
        chars = [ch for ch in completion_text(completion) if not ch.isspace()]
        out.append(sum(map(is_japanese_char, chars)) / len(chars) if chars else 0.0)
    return out


# ---------------------------------------------------------------------- specs


def parse_reward_spec(spec: str) -> tuple[str, str | None]:
    """``"format:^a$"`` -> ``("format", "^a$")``; checks the argument (regex compiles, length is an integer)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a reward spec must be a non-empty string, got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind == "exact_match" or kind == "ja":
        if arg:
            raise ConfigError(f"reward {kind!r} takes no argument, got {spec!r}")
        return kind, None
    if kind == "format":
        try:
            re.compile(arg)
        except re.error as e:
            raise ConfigError(f"reward {spec!r}: the regular expression does not compile: {e}") from e
        return kind, arg
    if kind == "length":
        if arg and not (arg.isdigit() and int(arg) > 0):
            raise ConfigError(f"reward {spec!r}: the target length must be a positive number of characters")
        return kind, arg or None
    if kind == "python":
        path, sep, func = arg.rpartition(":")  # rpartition: a Windows path has a colon of its own
        if not sep or not path or not func.isidentifier():
            raise ConfigError(f"reward {spec!r}: write python:FILE.py:FUNCTION, e.g. python:rewards.py:my_reward")
        return kind, arg
    raise ConfigError(
        f"unknown reward {spec!r}; use exact_match, format:REGEX, length[:CHARS], ja or python:FILE.py:FUNCTION"
    )


def parse_reward_weights(text: str) -> list[float]:
    """``"1,0.2"`` -> ``[1.0, 0.2]``."""
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError as e:
        raise ConfigError(f"reward_weights must be numbers separated by commas (e.g. 1,0.2), got {text!r}") from e


def load_reward_function(path: str | Path, name: str) -> RewardFunc:
    """The function ``name`` of the Python file at ``path``, imported from its path (its own folder importable)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"reward file {path} does not exist")
    module_name = f"aift_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours, as `python rewards.py` would
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"reward file {path} failed to import: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
    func = getattr(module, name, None)
    if func is None:
        found = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise ConfigError(f"reward file {path} has no function {name!r}; its functions: {', '.join(found) or 'none'}")
    if not callable(func):
        raise ConfigError(f"{name!r} in reward file {path} is a {type(func).__name__}, not a function")
    return func


def load_reward(spec: str) -> Reward:
    """The reward a spec names (a ``python:`` path is relative to the working directory)."""
    kind, arg = parse_reward_spec(spec)
    if kind == "exact_match":
        return Reward("exact_match", exact_match, spec)
    if kind == "format":
        return Reward("format", format_reward(arg), spec)
    if kind == "length":
        return Reward("length", length_penalty(int(arg) if arg else DEFAULT_LENGTH_TARGET), spec)
    if kind == "ja":
        return Reward("ja", japanese_share, spec)
    path, _, func_name = arg.rpartition(":")
    return Reward(func_name, load_reward_function(path, func_name), spec)


def load_rewards(specs: Sequence[str]) -> list[Reward]:
    """The rewards of ``specs``, in order; a repeated name gets a suffix (``format``, ``format_2``)."""
    if not specs:
        raise ConfigError("GRPO needs at least one reward function: --reward exact_match (or format:REGEX, ...)")
    rewards, seen = [], {}
    for spec in specs:
        reward = load_reward(spec)
        seen[reward.name] = seen.get(reward.name, 0) + 1
        if seen[reward.name] > 1:
            reward = Reward(f"{reward.name}_{seen[reward.name]}", reward.func, spec)
        rewards.append(reward)
    return rewards


# ---------------------------------------------------------------------- scoring


def score(
    rewards: Sequence[Reward],
    prompts: list,
    completions: list,
    columns: dict[str, list] | None = None,
    *,
    step: int,
    completion_ids: list[list[int]] | None = None,
    state: RewardState | None = None,
) -> torch.Tensor:
    """``[len(completions), len(rewards)]`` fp32 rewards, NaN where a function returned None.

    Raises :class:`RewardError` naming the function, the step and the sample when a function raises, returns
    the wrong number of values, or returns something that is not a finite number or None.
    """
    kwargs = {**(columns or {}), "completion_ids": completion_ids, "trainer_state": state or RewardState(step)}
    table = torch.empty(len(completions), len(rewards), dtype=torch.float32)
    for j, reward in enumerate(rewards):
        values = _call(reward, prompts, completions, kwargs, step)
        table[:, j] = torch.tensor([_as_float(v, reward, step, i, prompts) for i, v in enumerate(values)])
    return table


def _call(reward: Reward, prompts: list, completions: list, kwargs: dict, step: int) -> list:
    try:
        out = reward.func(prompts=prompts, completions=completions, **kwargs)
    except Exception as e:
        sample = _first_failing_sample(reward, prompts, completions, kwargs)
        where = f"on sample {sample} ({_excerpt(prompts[sample])})" if sample is not None else "on the batch"
        raise RewardError(
            f"reward function {reward.name!r} raised {type(e).__name__}: {e} at step {step}, {where}"
        ) from e
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise RewardError(
            f"reward function {reward.name!r} returned a {type(out).__name__} at step {step}; it must return a list "
            f"with one float (or None) per completion"
        )
    if len(out) != len(completions):
        raise RewardError(
            f"reward function {reward.name!r} returned {len(out)} value(s) for {len(completions)} completions at "
            f"step {step} (samples 0-{len(completions) - 1}); it must return one float (or None) per completion"
        )
    return list(out)


def _first_failing_sample(reward: Reward, prompts: list, completions: list, kwargs: dict) -> int | None:
    """The first sample on which the function raises when called on it alone; None if none does."""
    for i in range(len(completions)):
        one = {
            k: (v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v) for k, v in kwargs.items()
        }
        try:
            reward.func(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **one)
        except Exception:
            return i
    return None


def _as_float(value: Any, reward: Reward, step: int, sample: int, prompts: list) -> float:
    if value is None:
        return math.nan
    if not isinstance(value, numbers.Real) and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    what = "a non-finite number" if isinstance(value, numbers.Real) else f"a {type(value).__name__}"
    raise RewardError(
        f"reward function {reward.name!r} returned {what} ({value!r}) at step {step} for sample {sample} "
        f"({_excerpt(prompts[sample])}); return a finite float, or None to leave this function out for the sample"
    )


def _excerpt(prompt: str | list[dict], width: int = 60) -> str:
    text = " ".join(completion_text(prompt).split())
    return f"prompt {text[:width] + ('...' if len(text) > width else '')!r}"
