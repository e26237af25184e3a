"""The tcmalloc launcher: when it re-executes, and that the re-executed process really runs on tcmalloc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from optional_pieces import require

from aift.utils.allocator import describe_allocator, find_tcmalloc, physical_cores, should_reexec, tcmalloc_mapped

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"


@pytest.mark.parametrize(
    ("disabled", "library", "mapped", "ld_preload", "expected"),
    [
        (False, LIB, False, "", True),  # found, not loaded: re-exec
        (False, LIB, False, "/opt/libfoo.so", True),  # other preloads do not count
        (True, LIB, False, "", False),  # --no-tcmalloc
        (False, None, False, "", False),  # not installed
        (False, LIB, True, LIB, False),  # already running on it
        (False, LIB, False, f"/opt/libfoo.so:{LIB}", False),  # tried once and it did not map: no loop
    ],
)
def test_reexec_decision(disabled, library, mapped, ld_preload, expected):
    assert should_reexec(disabled, library, mapped, {"LD_PRELOAD": ld_preload}) is expected


def test_mapped_is_read_from_the_maps_text():
    assert tcmalloc_mapped("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4.5.10\n")
    assert not tcmalloc_mapped("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")


def test_log_phrase_names_the_reason():
    assert "tcmalloc" in describe_allocator(False, LIB, True)
    assert "--no-tcmalloc" in describe_allocator(True, LIB, False)
    assert "not found" in describe_allocator(False, None, False)


def test_physical_cores_is_within_the_usable_cpus():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


PROBE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s');"
    "from aift.utils.allocator import maybe_reexec_with_tcmalloc;"
    "maybe_reexec_with_tcmalloc(disabled=(sys.argv[1] == 'off'));"
    "print('MAPPED' if 'libtcmalloc' in open('/proc/self/maps').read() else 'NOT-MAPPED')"
)


def run_probe(mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120, check=True
    )


def test_subprocess_reexecs_onto_tcmalloc_and_says_so():
    require(find_tcmalloc() is not None, "libtcmalloc.so.4 is not installed (setup/install_system_libs.sh)")
    out = run_probe("on")
    assert out.stdout.strip() == "MAPPED"
    assert "allocator: tcmalloc" in out.stderr
    assert out.stderr.count("allocator:") == 1  # one line, from the process that carries on


def test_no_tcmalloc_keeps_the_system_allocator():
    out = run_probe("off")
    assert out.stdout.strip() == "NOT-MAPPED"
    assert "--no-tcmalloc" in out.stderr


def test_train_bench_and_demo_take_no_tcmalloc_flag():
    from aift.cli import LAUNCHED_COMMANDS, build_parser

    assert set(LAUNCHED_COMMANDS) == {"train", "bench", "demo"}
    for name in LAUNCHED_COMMANDS:
        assert build_parser(name).parse_args(["--no-tcmalloc"]).no_tcmalloc is True
    assert build_parser("bench").parse_args([]).no_tcmalloc is False
