"""Row shapes: which columns a row of a task holds, how it becomes an example, and the counting of dropped rows.

Each task of `aift prepare` has one ``ShapeTable`` (SFT's in aift.data.sources, preference's in
aift.data.preference): its shapes in detection order, each with its required columns, its converter and the
words the error message lists it with. A new kind of row is a new entry of a table, not a new reader.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aift.data import DataError

log = logging.getLogger(__name__)


class Drop(Exception):
    """A row that cannot become an example.

    The message is the reason counted in prepare.json; ``detail`` names the field and what was expected,
    for the row-level messages (``--strict``, and the first rows of a file that drops too many).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.detail = detail

    def describe(self) -> str:
        return f"{self}: {self.detail}" if self.detail and self.detail != str(self) else str(self)


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "line 7" or "row 3", for messages


@dataclass(frozen=True)
class Shape:
    """One accepted row shape: the columns it needs (and may have), its converter and how messages name it."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[dict], Any]  # a row's data -> an example of the task; Drop when the row is unusable
    help: str  # "instruction/input/output (alpaca)": what the error listing accepted shapes says


@dataclass(frozen=True)
class ShapeTable:
    """A task's accepted shapes, tried in order, and the hint that names a column an almost-matching row lacks."""

    what: str  # "data", "preference": the error says "cannot tell the {what} shape"
    shapes: dict[str, Shape]
    hint: Callable[[set[str]], str] = lambda columns: ""  # " (missing 'rejected')" or ""

    def help(self) -> str:
        """Every accepted shape, in detection order: the list the error messages show."""
        return ", ".join(shape.help for shape in self.shapes.values())

    def detect(self, columns, origin: str, allowed: tuple[str, ...] | None = None) -> str:
        """The first shape (of ``allowed``, default all) whose required columns are present; DataError otherwise."""
        present = set(columns)
        for name in allowed or self.shapes:
            if set(self.shapes[name].required) <= present:
                return name
        if allowed:
            wanted = " or ".join("/".join(self.shapes[s].required) for s in allowed)
            raise DataError(f"{origin}: expected the columns {wanted}; found {sorted(present)}")
        raise DataError(
            f"{origin}: cannot tell the {self.what} shape from columns {sorted(present)}{self.hint(present)}; "
            f"expected one of: {self.help()}"
        )


@dataclass
class Loaded:
    """The examples read from a source (conversations for SFT), with what was dropped and why."""

    examples: list[Any]
    wheres: list[str]
    shape: str
    read: int
    dropped: Counter = field(default_factory=Counter)
    total_available: int = 0
    first_dropped: list[str] = field(default_factory=list)  # "line 3: missing answer: ..." for the first few

    def note_first_dropped(self, where: str, reason: str) -> None:
        """Keeps the first few dropped rows, for the message of a file that drops too many."""
        if len(self.first_dropped) < 3:
            self.first_dropped.append(f"{where}: {reason}")


def convert_rows(rows: list[Row], table: ShapeTable, shape: str, origin: str, strict: bool = False) -> Loaded:
    """Converts rows of a shape; rows that cannot be converted are counted by reason (or raise with strict)."""
    convert = table.shapes[shape].convert
    loaded = Loaded([], [], shape, read=len(rows))
    for row in rows:
        try:
            example = convert(row.data)
        except Drop as e:
            if strict:
                raise DataError(
                    f"{origin} {row.where}: {e.describe()} (without --strict such rows are dropped and counted)"
                ) from e
            if loaded.dropped[str(e)] < 3:
                log.warning("%s %s dropped: %s", origin, row.where, e.describe())
            loaded.note_first_dropped(row.where, e.describe())
            loaded.dropped[str(e)] += 1
            continue
        loaded.examples.append(example)
        loaded.wheres.append(row.where)
    return loaded
