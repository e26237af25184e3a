"""The benchmark's data: a synthetic instruction set (or the user's rows), as chat messages and as token ids.

The synthetic rows are those behind ../shared BASELINES.md (2,000 rows, seed 0, answers of 10 to 400
words), drawn with the same generator so that figures stay comparable across runs and machines.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from aift.errors import AiftError

_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her it an are were which be this had not "
    "have but or one all their they there been has more when who will would its no out if so up what about "
    "into than them can only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three"
)
WORDS = _WORD_LIST.split()


class BenchDataError(AiftError, ValueError):
    """The rows given with --data cannot be used; the message names the file and the row."""


def synthetic_rows(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """Instruction/output rows of random common words; prompts 5-60 words, answers 10-80 or 80-400 words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        n_in = rng.randint(5, 60)
        n_out = rng.choice([rng.randint(10, 80), rng.randint(80, 400)])  # both drawn, as the baseline script does
        instruction = " ".join(rng.choices(WORDS, k=n_in)).capitalize() + "?"
        output = " ".join(rng.choices(WORDS, k=n_out)).capitalize() + "."
        rows.append({"instruction": instruction, "input": "", "output": output})
    return rows


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a JSON list or a JSONL file; each needs instruction+output (alpaca) or messages."""
    path = Path(path)
    if not path.is_file():
        raise BenchDataError(f"--data {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else _jsonl(text, path)
    except json.JSONDecodeError as e:
        raise BenchDataError(f"{path}: not valid JSON ({e})") from e
    for i, row in enumerate(rows):
        to_messages(row, where=f"{path} row {i + 1}")
    return rows


def _jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchDataError(f"{path} line {line_no}: not valid JSON ({e.msg})") from e
    return rows


def to_messages(row: dict[str, Any], where: str = "row") -> list[dict[str, str]]:
    """A user/assistant conversation from an alpaca row (instruction, input, output) or a messages row."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    if not isinstance(row, dict) or not row.get("instruction") or "output" not in row:
        raise BenchDataError(f"{where}: expected 'instruction' and 'output' (alpaca) or 'messages'")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_length: int) -> list[int]:
    """Token ids of the chat-template rendering, truncated to max_length (as TRL's SFTTrainer does)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return list(ids[:max_length])
