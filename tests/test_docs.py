"""The docs cannot rot: every `aift` command of README.md and docs/*.md runs, and the options tables are --help.

How the commands run (tiny settings, `# needs:` markers, servers): docs/index.md, "How the docs are tested".
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from docs_runner import REPO, DocCommandError, commands_of, run_page, tiny_settings

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES_WITH_COMMANDS = [p for p in PAGES if commands_of(p)]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS, ids=lambda p: p.name)
def test_every_command_of_the_page_runs(page, tmp_path, embedded_dir):
    ran = run_page(page, tmp_path / "work")
    assert ran, f"{page.name}: no commands"


def test_the_options_tables_are_what_help_says_now():
    gen = _gen_docs()
    stale = gen.stale_pages(PAGES)
    assert not stale, f"{[p.name for p in stale]}: run python scripts/gen_docs.py"
    # The tables that must exist (one source of truth for these commands' options):
    for page, source in [
        ("training.md", "aift train --help"),
        ("training.md", "fields of aift.config.TrainingConfig"),
        ("data.md", "aift prepare --help"),
    ]:
        assert f"<!-- generated: {source} -->" in (REPO / "docs" / page).read_text(), (page, source)


def test_a_table_differing_from_help_is_found(tmp_path):
    gen = _gen_docs()
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- generated: aift prepare --help -->\n| `--gone` | - | an old flag |\n<!-- generated: end -->\n"
    )
    assert gen.stale_pages([page]) == [page]
    page.write_text(gen.render(page.read_text()))
    assert gen.stale_pages([page]) == []
    assert "`--max-length MAX_LENGTH` | `2048` | tokens per example" in page.read_text()


def test_the_train_table_carries_each_field_help():
    from aift.config import TrainingConfig, field_help

    table = _gen_docs().command_table("train")
    for name, text in field_help(TrainingConfig).items():
        if name not in ("world_size", "strategy", "max_memory_per_gpu", "pipeline_parallel_size", "pipeline_schedule"):
            assert " ".join(text.split()).replace("|", "\\|") in table, name


def test_every_page_is_in_the_index_and_the_readme():
    index = (REPO / "docs" / "index.md").read_text()
    readme = (REPO / "README.md").read_text()
    for page in (REPO / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not link {page.name}"
    linked = re.findall(r"\]\(docs/([^)#]+\.md)", readme)
    missing = [name for name in linked if not (REPO / "docs" / name).is_file()]
    assert not missing, f"README links missing pages {missing}"


def test_the_tiny_settings_name_real_flags():
    from aift.cli import COMMANDS, build_parser

    tiny = tiny_settings()
    assert {"prepare", "train", "eval", "generate"} <= set(tiny)
    for name, flags in tiny.items():
        assert name in COMMANDS, name
        known = {s for a in build_parser(name)._actions for s in a.option_strings}
        assert [f for f in flags if f.startswith("--") and f not in known] == [], name


# The runner itself: what it extracts, and that a broken command fails it.

PAGE = """# A page
```bash
aift models   # a comment
aift train --dataset-path d \\
   --use-lora
make demo
aift train cfg.yaml --nproc-per-node 8   # needs: gpu
```
```text
aift not-a-command shown as output
```
"""


def test_commands_are_read_from_bash_blocks_only(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(PAGE)
    found = [(c.line, c.argv, c.needs) for c in commands_of(page)]
    assert found == [
        (3, ("models",), None),
        (4, ("train", "--dataset-path", "d", "--use-lora"), None),
        (7, ("train", "cfg.yaml", "--nproc-per-node", "8"), "gpu"),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("aift trian --help-me   # needs: gpu", "no such command 'trian'"),
        ("aift train --max-stepz 1   # needs: gpu", "does not parse"),
        ("aift recommend --gpu-memory 24 --gpuz 2", "exit: 2"),
        ("aift models --formats # needs: cloud", "expected one of"),
        ("aift models | head", "no shell syntax"),
    ],
)
def test_a_broken_command_fails_the_page(tmp_path, line, message):
    page = tmp_path / "broken.md"
    page.write_text(f"```bash\naift models\n{line}\n```\n")
    with pytest.raises(DocCommandError, match=re.escape(message)) as raised:
        run_page(page, tmp_path / "work", tiny={})
    assert "broken.md:3" in str(raised.value)


def test_a_command_that_fails_at_run_time_fails_the_page(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```bash\naift preview datasets/never-prepared -n 1\n```\n")
    with pytest.raises(DocCommandError, match=r"p\.md:2: aift preview datasets/never-prepared[\s\S]*exit: 2"):
        run_page(page, tmp_path / "work", tiny={})


def test_tiny_settings_are_appended_and_pages_run_in_their_own_folder(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```bash\naift recommend --gpu-memory 24\n```\n")
    # --gpus is appended: a value argparse rejects proves the table's flags reach the command.
    with pytest.raises(DocCommandError, match=r"ran as: aift recommend --gpu-memory 24 --gpus many"):
        run_page(page, tmp_path / "work", tiny={"recommend": ["--gpus", "many"]})
    assert (tmp_path / "work" / "data" / "ja_qa.json").is_file()
    assert Path.cwd() != tmp_path / "work"


def test_an_identical_prepare_is_copied_not_run_again(tmp_path, monkeypatch):
    import docs_runner

    runs = []

    def prepare(command, argv):  # stands in for the real run: what it writes depends on its argv and input
        runs.append(argv)
        out = Path("datasets/t")
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.txt").write_text(f"{argv} {Path('examples/tasks.json').stat().st_size}")

    monkeypatch.setattr(docs_runner, "_run_in_process", prepare)
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\naift prepare --source-path examples/tasks.json --output-dir datasets/t --val-ratio 0.5\n```\n"
    )
    run_page(page, tmp_path / "one", tiny={})
    run_page(page, tmp_path / "two", tiny={})
    assert len(runs) == 1
    rows = "datasets/t/rows.txt"
    assert (tmp_path / "two" / rows).read_text() == (tmp_path / "one" / rows).read_text()
    run_page(page, tmp_path / "three", tiny={"prepare": ["--max-length", "64"]})  # other flags: a run of its own
    assert len(runs) == 2 and "64" in (tmp_path / "three" / rows).read_text()


def test_the_prepare_key_is_the_argv_and_the_bytes_of_the_files_it_names(tmp_path):
    from docs_runner import _prepare_key

    source = tmp_path / "rows.json"
    source.write_text("[1]")
    first = _prepare_key(["--source-path", str(source)])
    assert _prepare_key(["--source-path", str(source)]) == first
    source.write_text("[2]")
    assert _prepare_key(["--source-path", str(source)]) != first
    assert _prepare_key(["--source-path", str(tmp_path)]) != _prepare_key(["--source-path", str(source)])
