"""Runs the `aift ...` commands of a Markdown page, as tests/test_docs.py does for README.md and docs/*.md.

A command is a line of a ```bash block whose first word is `aift` (a trailing `\\` continues it). It runs
in-process through `aift.cli.main`, in the page's own work folder, with the tiny settings of docs/index.md
("How the docs are tested") appended, so that each finishes in seconds on the embedded model. A command
ending in `# needs: gpu|hub|nodes|long` is only parsed (argparse, as `--help` would). `aift serve` and
`aift webui` block: they are started in a process of their own on a free port, asked one request, stopped.
An `aift prepare` run identical to an earlier one of the session (same argv, same input files' bytes) is not run
again: its page gets a copy of the files the first run wrote (`data/ja_qa.json` into `datasets/ja_qa` is on 7 pages).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INDEX = REPO / "docs" / "index.md"
NEEDS = ("gpu", "hub", "nodes", "long")
# Folders a page's relative paths may name (examples/x.json, data/ja_qa.json, configs/...): copied, so no
# command can write into the checkout.
INPUT_DIRS = ("examples", "data", "configs", "bench/plan/configs")
SHELL_SYNTAX = {"|", "||", "&&", ";", ">", ">>", "<", "&"}
# Blocking servers: the path asked once it listens (it must answer 200).
SERVERS = {"serve": "/v1/models", "webui": "/"}
SERVER_START_S = 180
# The files each distinct `aift prepare` run wrote (path relative to the page's folder -> bytes), by _prepare_key.
_PREPARED: dict[str, dict[str, bytes]] = {}


class DocCommandError(AssertionError):
    """A documented command that does not work; the message names the page, its line and the output."""


@dataclass(frozen=True)
class DocCommand:
    page: Path
    line: int  # 1-based line of the page where the command starts
    argv: tuple[str, ...]  # without the leading `aift`
    needs: str | None  # gpu, hub, nodes or long: parsed only

    def where(self) -> str:
        return f"{self.page.name}:{self.line}: aift {shlex.join(self.argv)}"


def commands_of(page: Path) -> list[DocCommand]:
    """The `aift` commands of the page's ```bash blocks, in order."""
    commands = []
    for line_no, text in _bash_lines(page.read_text(encoding="utf-8")):
        needs = _needs(text, page, line_no)
        try:
            words = shlex.split(text, comments=True)
        except ValueError as e:
            raise DocCommandError(f"{page.name}:{line_no}: cannot split {text!r}: {e}") from e
        if not words or words[0] != "aift":
            continue
        if SHELL_SYNTAX & set(words):
            raise DocCommandError(f"{page.name}:{line_no}: one plain command per line, no shell syntax: {text!r}")
        commands.append(DocCommand(page, line_no, tuple(words[1:]), needs))
    return commands


def _bash_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every ```bash block, `\\`-continued lines joined."""
    out, in_bash, pending, start = [], False, "", 0
    for no, line in enumerate(text.splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            in_bash = not in_bash and fence[3:].strip() in ("bash", "sh", "shell", "console")
            continue
        if not in_bash:
            continue
        if not pending:
            start = no
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _needs(text: str, page: Path, line_no: int) -> str | None:
    match = re.search(r"#\s*needs:\s*(\S+)", text)
    if match is None:
        return None
    if match.group(1) not in NEEDS:
        raise DocCommandError(f"{page.name}:{line_no}: `# needs: {match.group(1)}`; expected one of {NEEDS}")
    return match.group(1)


def tiny_settings(index: Path = INDEX) -> dict[str, list[str]]:
    """command -> the flags appended to each run of it, from the table in docs/index.md."""
    text = index.read_text(encoding="utf-8")
    begin, end = "<!-- tiny settings: begin -->", "<!-- tiny settings: end -->"
    if begin not in text or end not in text:
        raise DocCommandError(f"{index}: no table between {begin} and {end}")
    table = {}
    for row in text.split(begin)[1].split(end)[0].splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`aift "):
            table[cells[0].strip("`").split()[1]] = shlex.split(cells[1].strip("`")) if cells[1] != "-" else []
    return table


def prepare_workdir(workdir: Path) -> Path:
    """A fresh folder holding copies of the repo's input folders, where a page's commands run."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in INPUT_DIRS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
    return workdir


def run_page(page: Path, workdir: Path, tiny: dict[str, list[str]] | None = None) -> list[DocCommand]:
    """Runs (or parses) every command of the page in order in workdir; raises DocCommandError on the first failure."""
    tiny = tiny_settings() if tiny is None else tiny
    commands = commands_of(page)
    prepare_workdir(workdir)
    here = Path.cwd()
    os.chdir(workdir)
    try:
        for command in commands:
            run_command(command, tiny)
    finally:
        os.chdir(here)
    return commands


def run_command(command: DocCommand, tiny: dict[str, list[str]]) -> None:
    if not command.argv:
        raise DocCommandError(f"{command.where()}: no subcommand")
    if command.needs is not None:
        _parse_only(command)
    elif command.argv[0] in SERVERS:
        _run_server(command, tiny.get(command.argv[0], []))
    elif command.argv[0] == "prepare":
        _run_prepare(command, [*command.argv, *tiny.get("prepare", [])])
    else:
        _run_in_process(command, [*command.argv, *tiny.get(command.argv[0], [])])


def _run_prepare(command: DocCommand, argv: list[str]) -> None:
    """Runs `aift prepare`, or writes what the same run on the same inputs wrote before (in the current folder)."""
    key = _prepare_key(argv)
    if key in _PREPARED:
        for name, data in _PREPARED[key].items():
            Path(name).parent.mkdir(parents=True, exist_ok=True)
            Path(name).write_bytes(data)
        return
    before = _file_stats(Path("."))
    _run_in_process(command, argv)
    _PREPARED[key] = {
        name: Path(name).read_bytes() for name, st in _file_stats(Path(".")).items() if before.get(name) != st
    }


def _prepare_key(argv: list[str]) -> str:
    """The argv and the bytes of every file it names (a folder: each file under it)."""
    digest = hashlib.sha256("\0".join(argv).encode())
    for word in argv:
        path = Path(word)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in files:
            digest.update(f"\0{file}\0".encode() + file.read_bytes())
    return digest.hexdigest()


def _file_stats(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (st.st_size, st.st_mtime_ns) for p in root.rglob("*") if p.is_file() for st in [p.stat()]}


def _parse_only(command: DocCommand) -> None:
    from aift.cli import COMMANDS, build_parser

    name = command.argv[0]
    if name not in COMMANDS:
        raise DocCommandError(f"{command.where()}: no such command {name!r}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser(name).parse_args(list(command.argv[1:]))
    except SystemExit as e:
        raise DocCommandError(f"{command.where()} (# needs: {command.needs}): does not parse\n{err.getvalue()}") from e


def _run_in_process(command: DocCommand, argv: list[str]) -> None:
    from aift.cli import main

    out, err = _text_stream(), _text_stream()  # with .buffer: some commands write bytes (aift bench)
    stdin = io.StringIO("/exit\n")  # `aift chat` reads its turns from stdin
    code: int | str | None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _stdin(stdin):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a flag the command no longer has
            code = e.code
        except Exception as e:  # noqa: BLE001 - any crash of a doc command is its failure, shown with its output
            code = f"{type(e).__name__}: {e}"
    if code != 0:
        raise DocCommandError(
            f"{command.where()}\n  ran as: aift {shlex.join(argv)}\n  exit: {code}\n"
            f"--- stdout ---\n{_text(out)[-3000:]}\n--- stderr ---\n{_text(err)[-3000:]}"
        )


def _text_stream() -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="replace", write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    return stream.buffer.getvalue().decode("utf-8", errors="replace")


@contextlib.contextmanager
def _stdin(stream: io.StringIO):
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


def _run_server(command: DocCommand, tiny: list[str]) -> None:
    """Starts `aift serve|webui` on a free port, waits for its first 200, then stops it with Ctrl-C."""
    port = _free_port()
    argv = [*command.argv, *tiny, "--host", "127.0.0.1", "--port", str(port)]
    log = Path(f"server-{command.line}.log")
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "aift", *argv], stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_for(proc, f"http://127.0.0.1:{port}{SERVERS[command.argv[0]]}", _api_key(argv), command, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(proc: subprocess.Popen, url: str, key: str | None, command: DocCommand, log: Path) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DocCommandError(f"{command.where()}: exited with {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise DocCommandError(f"{command.where()}: {url} did not answer in {SERVER_START_S} s\n{log.read_text()[-3000:]}")


def _api_key(argv: list[str]) -> str | None:
    keys = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--api-key"]
    return keys[-1] if keys else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
