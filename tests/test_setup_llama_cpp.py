"""setup/build_llama_cpp.sh, run by `make setup`: builds llama-cpp-python once, reuses the cached wheel, and
never fails the set-up. A stand-in python records what the script asks of it (no compiler, no network)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "setup" / "build_llama_cpp.sh"
NOTE = "setup: note: llama-cpp-python could not be built; the llama.cpp GGUF tests skip"

# `-c` import check: true once a wheel was installed. `-m pip wheel ... -w DIR`: writes a wheel into DIR (or
# fails with FAIL_BUILD set). `-m pip install WHEEL`: records it as installed.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$STATE/calls"
if [ "$1" = -c ]; then
  case "$2" in *llama_cpp*) [ -f "$STATE/installed" ] && exit 0 || exit 1 ;; esac
elif [ "$3" = wheel ]; then
  [ -n "${FAIL_BUILD:-}" ] && { echo "error: compiler exploded" >&2; exit 1; }
  while [ $# -gt 0 ]; do [ "$1" = -w ] && out=$2; shift; done
  touch "$out/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
elif [ "$3" = install ]; then
  echo "${@: -1}" > "$STATE/installed"
fi
"""


def _setup(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (tmp_path / "installed").unlink(missing_ok=True)
    (tmp_path / "calls").unlink(missing_ok=True)
    env = {"PATH": "/usr/bin:/bin", "STATE": str(tmp_path), "AIFT_WHEEL_CACHE": str(tmp_path / "cache"), **env}
    done = subprocess.run(["bash", str(SCRIPT), str(python)], env=env, capture_output=True, text=True, timeout=60)
    return done, (tmp_path / "calls").read_text().splitlines()


def test_builds_once_then_installs_the_cached_wheel(tmp_path):
    first, calls = _setup(tmp_path)
    assert first.returncode == 0 and NOTE not in first.stdout, first.stdout + first.stderr
    assert any("pip wheel --no-deps --no-cache-dir" in c and "llama-cpp-python==0.3.36" in c for c in calls)
    wheels = list((tmp_path / "cache").glob("llama-cpp-python-0.3.36-*/*.whl"))
    assert len(wheels) == 1 and (tmp_path / "installed").read_text().strip() == str(wheels[0])
    assert not list((tmp_path / "cache").glob(".build-*")), "no half-built folder left in the cache"

    again, calls = _setup(tmp_path)  # a fresh venv on the same machine: the cached wheel, no compiler
    assert again.returncode == 0 and not any("pip wheel" in c for c in calls)
    assert (tmp_path / "installed").read_text().strip() == str(wheels[0])


def test_a_failed_build_is_one_note_and_not_a_failed_setup(tmp_path):
    done, _ = _setup(tmp_path, FAIL_BUILD="1")
    assert done.returncode == 0
    assert NOTE in done.stdout and "see " in done.stdout
    assert not (tmp_path / "installed").exists()
    assert not list((tmp_path / "cache").glob("llama-cpp-python-*/*.whl")), "a failed build caches nothing"


def test_make_setup_runs_the_script():
    assert "bash setup/build_llama_cpp.sh $(BIN)/python" in (REPO / "Makefile").read_text()
