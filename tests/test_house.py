"""Import arrows only point down the layers, inside functions too: a new arrow running back up fails here.

The layers follow the way data flows: raw rows -> token ids (data) -> decoding (inference) -> the loop
(training) -> processes (distributed) -> what uses a trained model (eval, quant, serve) -> front ends.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "aift"

# Bottom to top. Packages on one line are peers: neither imports the other.
LAYERS = [
    ("errors",),
    ("units",),
    ("config",),
    ("utils",),
    ("models",),
    ("data",),
    ("inference", "lora", "export"),
    ("training",),
    ("distributed",),
    ("eval", "quant", "serve"),
    ("bench", "webui"),
    ("cli",),
    ("__init__", "__main__"),
]
LEVEL = {name: level for level, group in enumerate(LAYERS) for name in group}


def package_of(path: Path, src: Path) -> str:
    """The top-level piece of aift a file belongs to: 'training' for training/loop.py, 'config' for config.py."""
    rel = path.relative_to(src)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_packages(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, aift package) of every import of aift in the file, at any depth, relative imports resolved."""
    module = [*path.relative_to(src).with_suffix("").parts]
    if module[-1] == "__init__":
        module = module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:  # from ..models import x, inside aift
            base = module[: len(module) - node.level + (path.stem == "__init__")]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [["aift", *target]] if target else [["aift", a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            names = [parts] if len(parts) > 1 else [[*parts, a.name] for a in node.names]
        else:
            continue
        found += [(node.lineno, n[1]) for n in names if n[0] == "aift" and len(n) > 1 and n[1] in LEVEL]
    return found


def violations(src: Path) -> list[str]:
    out = []
    for path in sorted(src.rglob("*.py")):
        here = package_of(path, src)
        if here not in LEVEL:
            out.append(f"{path.relative_to(src)}: aift.{here} is in no layer of tests/test_house.py")
            continue
        for line, there in imported_packages(path, src):
            if there != here and LEVEL[there] >= LEVEL[here]:
                out.append(f"{path.relative_to(src)}:{line} imports aift.{there}, which is not below aift.{here}")
    return out


def test_no_import_runs_back_up():
    found = violations(SRC)
    assert not found, "imports that run back up the layers (move the piece to where it belongs):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    from aift.training.loop import Run\n", ["utils/probe.py:2 imports aift.training"]),
        ("from ..models import loading\n", ["utils/probe.py:1 imports aift.models"]),
        ("from aift import data\n", ["utils/probe.py:1 imports aift.data"]),
        ("import aift.errors\nfrom . import gpu\n", []),
    ],
)
def test_the_check_sees_function_level_relative_and_package_imports(tmp_path, source, expected):
    probe = tmp_path / "aift" / "utils" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    assert [v.split(",")[0] for v in violations(tmp_path / "aift")] == expected


MAX_LINES = 500  # the house's limit for one file of src/ (issue #24)


def test_no_file_in_src_is_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split along a natural seam): {long}"
