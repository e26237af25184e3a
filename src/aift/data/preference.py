"""`aift prepare --task preference`: preference pairs (or KTO's labelled examples) -> token ids and answer labels.

Accepted row shapes (detected from the columns):

- TRL: ``prompt`` / ``chosen`` / ``rejected`` as strings, or ``prompt`` a list of messages and
  ``chosen`` / ``rejected`` lists of assistant messages; ``chosen`` / ``rejected`` full conversations alone
  (TRL's implicit prompt: the shared messages before the last answer).
- LLaMA-Factory: ``conversations`` (ShareGPT from/value) + ``chosen`` + ``rejected`` messages; and
  ``instruction`` / ``input`` / ``chosen`` / ``rejected``.
- Anthropic HH: ``chosen`` / ``rejected`` dialogues as text (``\\n\\nHuman: ... \\n\\nAssistant: ...``) sharing a prefix.
- KTO (unpaired): ``prompt`` / ``completion`` / ``label`` (bool), or ``messages`` / ``conversations`` + ``label``.

The shapes are ``PREFERENCE_SHAPES``, the task's table for the one pipeline of aift.data.prepare. The prompt
and each answer are rendered in the model's prompt format (the SFT format registry) and tokenized once;
labels mark the last answer (and its end-of-turn marker) only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aift.data import DataError, DatasetError
from aift.data.conversation import Message, PromptFormat, normalize
from aift.data.masking import encode
from aift.data.packing import count_trained_tokens
from aift.data.shapes import Drop, Loaded, Shape, ShapeTable
from aift.data.task import EncodeOptions

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One usable row: the prompt conversation (ending with a user turn) and its answer(s)."""

    prompt: list[Message]
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None


# ---------------------------------------------------------------------- rows -> samples


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        raise Drop(f"missing field '{key}'")
    if isinstance(value, str):
        if not value.strip():
            raise Drop(f"field '{key}' is empty")
        return value.strip()
    if isinstance(value, dict):  # one message
        return _message_content(value, key)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return _message_content(value[-1], key)  # a list of assistant messages: the answer is the last
    raise Drop(f"field '{key}' must be text or assistant messages, got {type(value).__name__}")


def _message_content(message: dict, key: str) -> str:
    content = message.get("content", message.get("value"))
    if not isinstance(content, str) or not content.strip():
        raise Drop(f"field '{key}' holds a message without content")
    return content.strip()


def _messages(row: dict, key: str, last_role: str) -> list[Message]:
    value = row.get(key)
    if isinstance(value, str) and value.strip().startswith("["):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except ValueError as e:
            raise Drop(f"field '{key}' is not valid JSON") from e
    if value is None:
        raise Drop(f"missing field '{key}'")
    if isinstance(value, str):
        if not value.strip():
            raise Drop(f"field '{key}' is empty")
        return [{"role": "user", "content": value.strip()}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise Drop(f"field '{key}' must be text or a list of messages")
    messages = [{"role": m.get("role", m.get("from")), "content": m.get("content", m.get("value"))} for m in value]
    try:
        return normalize(messages, last_role=last_role)
    except DataError as e:
        raise Drop(f"field '{key}': {e}") from e


def _with_system(row: dict, prompt: list[Message]) -> list[Message]:
    system = row.get("system")
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system.strip()}, *prompt]
    return prompt


def _trl(row: dict) -> Sample:
    prompt = _with_system(row, _messages(row, "prompt", "user"))
    return Sample(prompt, _text(row, "chosen"), _text(row, "rejected"))


def _llamafactory_sharegpt(row: dict) -> Sample:
    prompt = _with_system(row, _messages(row, "conversations", "user"))
    return Sample(prompt, _text(row, "chosen"), _text(row, "rejected"))


def _llamafactory_alpaca(row: dict) -> Sample:
    user: Message = {"role": "user", "content": _plain(row, "instruction")}
    if isinstance(row.get("input"), str) and row["input"].strip():
        user["input"] = row["input"].strip()
    return Sample(_with_system(row, [user]), _text(row, "chosen"), _text(row, "rejected"))


def _plain(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Drop(f"missing field '{key}'" if value is None else f"field '{key}' is empty")
    return value.strip()


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_dialogue(text: str, key: str) -> list[Message]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3 or parts[0].strip():
        raise Drop(f"field '{key}' is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogue")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2], strict=True)]
    try:
        return normalize(messages)
    except DataError as e:
        raise Drop(f"field '{key}': {e}") from e


def _implicit(row: dict) -> Sample:
    """Two full dialogues (HH text or message lists) that share everything up to the last answer."""
    dialogues = {}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if value is None:
            raise Drop(f"missing field '{key}'")
        dialogues[key] = _hh_dialogue(value, key) if isinstance(value, str) else _messages(row, key, "assistant")
    chosen, rejected = dialogues["chosen"], dialogues["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise Drop("'chosen' and 'rejected' do not share the dialogue before their last answer")
    return Sample(_with_system(row, chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"])


def _label(row: dict) -> bool:
    value = row.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Drop("missing field 'label'" if value is None else f"field 'label' must be true or false, got {value!r}")


def _kto_prompt_completion(row: dict) -> Sample:
    prompt = _with_system(row, _messages(row, "prompt", "user"))
    return Sample(prompt, completion=_text(row, "completion"), label=_label(row))


def _kto_conversation(key: str):
    def convert(row: dict) -> Sample:
        messages = _messages(row, key, "assistant")
        return Sample(_with_system(row, messages[:-1]), completion=messages[-1]["content"], label=_label(row))

    return convert


def _distinct(convert: Callable[[dict], Sample]) -> Callable[[dict], Sample]:
    """A pair converter that also drops a pair whose two answers are the same."""

    def checked(row: dict) -> Sample:
        sample = convert(row)
        if sample.chosen == sample.rejected:
            raise Drop("'chosen' and 'rejected' are the same answer")
        return sample

    return checked


# Detection tries the shapes in this order: KTO's label first, then the pair shapes from the most columns down.
SHAPES = {
    "kto": Shape(("prompt", "completion", "label"), (), _kto_prompt_completion, "prompt/completion/label (KTO)"),
    "kto_messages": Shape(("messages", "label"), (), _kto_conversation("messages"), "messages/label (KTO)"),
    "kto_conversations": Shape(
        ("conversations", "label"), (), _kto_conversation("conversations"), "conversations/label (KTO)"
    ),
    "llamafactory_sharegpt": Shape(
        ("conversations", "chosen", "rejected"),
        ("system",),
        _distinct(_llamafactory_sharegpt),
        "conversations/chosen/rejected (LLaMA-Factory)",
    ),
    "llamafactory_alpaca": Shape(
        ("instruction", "chosen", "rejected"),
        ("input", "system"),
        _distinct(_llamafactory_alpaca),
        "instruction/input/chosen/rejected (LLaMA-Factory)",
    ),
    "trl": Shape(
        ("prompt", "chosen", "rejected"),
        ("system",),
        _distinct(_trl),
        "prompt/chosen/rejected (TRL, strings or messages)",
    ),
    "implicit_prompt": Shape(
        ("chosen", "rejected"),
        ("system",),
        _distinct(_implicit),
        "chosen/rejected conversations (TRL implicit prompt or Anthropic HH text)",
    ),
}


def _missing_side(columns: set[str]) -> str:
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    return f" (missing '{missing[0]}')" if len(missing) == 1 else ""


PREFERENCE_SHAPES = ShapeTable("preference", SHAPES, _missing_side)


# ---------------------------------------------------------------------- samples -> token ids


def encode_answer(
    fmt: PromptFormat, tokenizer, prompt: list[Message], answer: str, max_length: int
) -> tuple[list[int], list[int], str | None]:
    """Token ids of prompt + answer and labels of the answer (with its end-of-turn marker) only."""
    rendered = fmt.render([*prompt, {"role": "assistant", "content": answer}], tokenizer)
    rendered = dataclasses.replace(rendered, spans=rendered.spans[-1:])  # earlier answers are prompt
    encoded = encode(rendered, tokenizer, max_length)
    return encoded.input_ids, encoded.labels, encoded.truncated


def _encode_sample(sample: Sample, options: EncodeOptions, truncated: Counter) -> dict[str, Any]:
    """One row of token ids for a pair or a labelled example; Drop when an answer keeps no trained token."""
    fmt, tokenizer, max_length = options.fmt, options.tokenizer, options.max_length
    prompt = sample.prompt
    if options.system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": options.system}, *prompt]
    answers = {"completion": sample.completion} if sample.completion is not None else {
        "chosen": sample.chosen, "rejected": sample.rejected
    }  # fmt: skip
    row: dict[str, Any] = {"prompt": fmt.generation_prompt(prompt, tokenizer)}
    for name, answer in answers.items():
        ids, labels, cut = encode_answer(fmt, tokenizer, prompt, answer, max_length)
        if count_trained_tokens(labels) == 0:
            raise Drop(f"no trained token in '{name}' after truncation to {max_length} tokens")
        if cut:
            truncated[cut] += 1
        prefix = "" if name == "completion" else f"{name}_"
        row.update({f"{prefix}input_ids": ids, f"{prefix}labels": labels, name: answer})
    if sample.label is not None:
        row["label"] = sample.label
    return row


@dataclass
class EncodedPairs:
    """The kept pairs (or KTO examples) as rows of token ids, and what was dropped and truncated."""

    rows: list[dict]
    kto: bool
    dropped: Counter
    truncated: Counter
    options: EncodeOptions

    @property
    def kept(self) -> int:
        return len(self.rows)

    @property
    def noun(self) -> str:
        return "examples" if self.kto else "pairs"

    def dataset(self, train: list[int], test: list[int]):
        return to_dataset_dict({"train": [self.rows[i] for i in train], "test": [self.rows[i] for i in test]}, self.kto)

    def info(self) -> dict:
        fmt, tokenizer = self.options.fmt, self.options.tokenizer
        return {
            "task": "kto" if self.kto else "preference",
            "end_of_turn": sorted({fmt.end_of_turn(tokenizer, last=True)}),
            "system": self.options.requested_system,
        }


def encode_samples(loaded: Loaded, options: EncodeOptions) -> EncodedPairs:
    """Rows of token ids for pairs or labelled examples; drop reasons and truncation counts."""
    from tqdm.auto import tqdm

    rows, dropped, truncated = [], Counter(), Counter()
    for sample, where in tqdm(list(zip(loaded.examples, loaded.wheres, strict=True)), desc="tokenizing"):
        try:
            rows.append(_encode_sample(sample, options, truncated))
        except (Drop, DataError) as e:
            log.warning("%s dropped: %s", where, e)
            dropped[str(e)] += 1
            loaded.note_first_dropped(where, str(e))
    return EncodedPairs(rows, loaded.shape.startswith("kto"), dropped, truncated, options)


def output_name(source: str, source_path: str | Path | None, model: str, num_samples: int | None) -> str:
    """``preference_{file stem}_{model basename}``, the folder under datasets/."""
    return f"preference_{Path(str(source_path)).stem}_{Path(str(model)).name}"


# ---------------------------------------------------------------------- writing


def _features(kto: bool):
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    if kto:
        columns = {"input_ids": ids, "labels": ids, "label": Value("bool"), "prompt": Value("string"),
                   "completion": Value("string")}  # fmt: skip
    else:
        columns = {"chosen_input_ids": ids, "chosen_labels": ids, "rejected_input_ids": ids, "rejected_labels": ids,
                   "prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string")}  # fmt: skip
    return Features(columns)


def to_dataset_dict(splits: dict[str, list[dict]], kto: bool):
    """The splits as a DatasetDict with the preference (or KTO) columns."""
    from datasets import Dataset, DatasetDict

    features = _features(kto)
    return DatasetDict(
        {
            name: Dataset.from_dict({c: [r[c] for r in rows] for c in features}, features=features)
            for name, rows in splits.items()
        }
    )


# ---------------------------------------------------------------------- reading back for training


def load_preference_rows(source: Any, name: str, split: str, method: str, max_length: int):
    """Rows for the preference objective from a prepared folder or a Dataset/DatasetDict/list of dicts.

    KTO also trains on pairs: each pair becomes a desirable and an undesirable example (as TRL does).
    Returns (rows, prompt format or None).
    """
    from aift.data.prepared import read_prepared

    prompt_format = None
    if isinstance(source, (str, Path)):
        source, meta = read_prepared(source)
        prompt_format = meta.get("prompt_format")
    if hasattr(source, "keys") and isinstance(getattr(source, "column_names", None), dict):
        if split not in source:
            raise DatasetError(f"the {name} dataset has no {split!r} split (splits: {', '.join(source.keys())})")
        source = source[split]
    rows = [dict(source[i]) for i in range(len(source))]
    paired = bool(rows) and "chosen_input_ids" in rows[0]
    if rows and not paired and "input_ids" not in rows[0]:
        raise DatasetError(
            f"the {name} dataset holds no preference pairs: prepare it with `aift prepare --task preference`"
        )
    if method != "kto" and rows and not paired:
        raise DatasetError(
            f"method {method} needs preference pairs (chosen and rejected); the {name} dataset holds unpaired "
            "examples with a label: train it with --method kto"
        )
    if method == "kto" and paired:
        rows = [
            {"input_ids": r[f"{k}_input_ids"], "labels": r[f"{k}_labels"], "label": k == "chosen"}
            for r in rows
            for k in ("chosen", "rejected")
        ]
    keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels") if method != "kto" else (
        "input_ids", "labels"
    )  # fmt: skip
    out = []
    for r in rows:
        row = {k: list(r[k])[:max_length] for k in keys}
        if method == "kto":
            row["label"] = bool(r["label"])
        out.append(row)
    return out, prompt_format


# ---------------------------------------------------------------------- preview


@dataclass
class PairPreview:
    """One prepared pair (KTO: one example) as runs of (text, trained) for each side."""

    index: int
    sides: dict[str, list[tuple[str, bool]]]
    trained: dict[str, int]
    label: bool | None = None


def preview_pairs(dataset, tokenizer, n: int) -> list[PairPreview]:
    """The first ``n`` rows of a prepared preference (or KTO) split, each side split into trained / untrained runs."""
    from aift.data.preview import _runs

    previews = []
    for i in range(min(n, len(dataset))):
        row = dataset[i]
        names = ("chosen", "rejected") if "chosen_input_ids" in row else ("completion",)
        sides, trained = {}, {}
        for name in names:
            prefix = "" if name == "completion" else f"{name}_"
            ids, labels = row[f"{prefix}input_ids"], row[f"{prefix}labels"]
            sides[name] = _runs(tokenizer, ids, labels)
            trained[name] = count_trained_tokens(labels)
        previews.append(PairPreview(i, sides, trained, row.get("label")))
    return previews
