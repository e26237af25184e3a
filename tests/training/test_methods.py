"""Every registered method is reachable where a user looks: `aift train --help` and the README's table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from aift.data.prepare import TASKS
from aift.training.methods import METHODS, get_method

README = Path(__file__).resolve().parents[2] / "README.md"


def test_each_method_names_a_prepare_task_and_builds():
    for method in METHODS.values():
        assert method.task in TASKS, f"{method.name}: task {method.task!r} is not an `aift prepare --task`"
        assert callable(method.build)


def test_every_method_is_in_train_help():
    help_text = subprocess.run(
        [sys.executable, "-m", "aift", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    choices = re.search(r"--method \{([^}]*)\}", help_text)
    assert choices is not None, help_text
    assert choices.group(1).split(",") == list(METHODS)


def test_the_readme_table_is_the_registry():
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- methods table: begin -->\n")[1].split("<!-- methods table: end -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([^`]+)`", r).group(1) for r in rows] == list(METHODS)
    for row, method in zip(rows, METHODS.values(), strict=True):
        assert method.summary in row and f"`{method.task}`" in row


def test_an_unknown_method_lists_the_known_ones():
    import pytest

    from aift.config import ConfigError

    with pytest.raises(ConfigError, match="sft, dpo, orpo, simpo, kto"):
        get_method("ppo")
