"""Regenerates the options tables of docs/*.md from their one source: `aift COMMAND --help` and the config fields.

    python scripts/gen_docs.py           # rewrite the tables in place
    python scripts/gen_docs.py --check   # exit 1 and name the pages whose tables differ (tests/test_docs.py)

A page asks for a table with a pair of markers; everything between them is replaced:

    <!-- generated: aift train --help -->          the flags of `aift train` (argparse: the text --help prints)
    <!-- generated: fields of aift.config.LoRAConfig -->   YAML keys of a config dataclass (metadata["help"])
    <!-- generated: end -->
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: (.+?) -->\n)(.*?)(<!-- generated: end -->)", re.DOTALL)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def command_table(name: str) -> str:
    """One table per argument group of `aift NAME`, in --help's order, with --help's words."""
    from aift.cli import build_parser

    parser = build_parser(name)
    out = []
    for group in parser._action_groups:  # argparse keeps --help's grouping only here
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"options": "options", "optional arguments": "options"}.get(group.title, group.title)
        out += [f"**{_cell(title)}**", "", "| option | default | what it does |", "| --- | --- | --- |"]
        out += [f"| {_usage(a)} | {_default(a)} | {_cell(_help(parser, a))} |" for a in actions]
        out.append("")
    return "\n".join(out)


def _usage(action: argparse.Action) -> str:
    if not action.option_strings:
        return _code(action.metavar or action.dest)
    flags = " ".join(action.option_strings)
    if action.nargs == 0:
        return _code(flags)
    if action.choices is not None:
        return _code(f"{flags} {{{','.join(map(str, action.choices))}}}")
    return _code(f"{flags} {action.metavar or action.dest.upper()}")


def _default(action: argparse.Action) -> str:
    if action.default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0:
        return "-"
    return _code(action.default)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as --help prints it (%(default)s and friends expanded)."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


def fields_table(dotted: str) -> str:
    """The YAML keys of a config dataclass: name, default and the field's own documentation."""
    module, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{f.name}` | {_code(repr(default))} | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(rows) + "\n"


def generate(source: str) -> str:
    command = re.fullmatch(r"aift (\S+) --help", source)
    if command:
        return command_table(command.group(1))
    fields = re.fullmatch(r"fields of (\S+)", source)
    if fields:
        return fields_table(fields.group(1))
    raise SystemExit(f"unknown table source {source!r}: expected 'aift COMMAND --help' or 'fields of MODULE.CLASS'")


def render(text: str) -> str:
    """The page with every generated table replaced by its current content."""
    return BLOCK.sub(lambda m: m.group(1) + generate(m.group(2)) + m.group(4), text)


def stale_pages(pages: list[Path] = PAGES) -> list[Path]:
    return [p for p in pages if render(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        stale = stale_pages()
        for page in stale:
            print(f"{page.relative_to(REPO)}: tables differ from --help; run python scripts/gen_docs.py")
        return 1 if stale else 0
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        if render(text) != text:
            page.write_text(render(text), encoding="utf-8")
            print(f"wrote {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
