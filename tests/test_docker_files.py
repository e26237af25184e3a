"""The Docker set-up of the usage guide: what can be checked without Docker (it cannot run on this machine).

`docker-compose.yml` parses and has the service and container `ai-ft-container` with a GPU reservation, `.env`
and volumes for outputs and the Hugging Face cache; the Dockerfile starts from a CUDA runtime image and runs
every install line of `make setup`, with the same flags; `.dockerignore` keeps secrets and outputs out of the
image but not the code. Not run here: `docker build` and a container on a GPU.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "ai-ft-container"
# Flags that change how an install prints or how long it takes, not what it installs: the Makefile's
# --no-compile leaves byte-compiling to the first import, while an image is better compiled once, at build.
QUIET_AND_SPEED_FLAGS = ("-q", "--no-compile")


def _pip_installs(lines: list[str], variables: dict[str, str]) -> list[list[str]]:
    """The arguments of each `pip install` command (after 'install', without -q), variables substituted."""
    installs = []
    for line in lines:
        if line.strip().lstrip("@").startswith("#"):  # a recipe comment (`@# ...`), not a command
            continue
        line = line.split("||")[0]
        for _ in range(3):  # a variable may name another: PIP := $(BIN)/pip install ...
            for name, value in variables.items():
                line = line.replace(f"$({name})", value).replace(f"${{{name}}}", value)
        words = shlex.split(line)
        if "pip" not in " ".join(words) or "install" not in words:
            continue
        installs.append([w for w in words[words.index("install") + 1 :] if w not in QUIET_AND_SPEED_FLAGS])
    return installs


# The Makefile's set-up layers, in order: `make demo` installs the first, `make test` (= `make setup`) both.
LAYERS = ("DEMO_STAMP", "TEST_STAMP")


def _makefile_layer(stamp: str) -> tuple[str, list[str]]:
    """A layer's prerequisites and recipe lines."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^\$\({stamp}\):(.*)\n((?:\t.*\n)+)", text, re.M)
    assert recipe, f"Makefile: no $({stamp}) recipe (the install steps of a set-up layer)"
    return recipe.group(1), recipe.group(2).splitlines()


def _makefile_setup_installs(layers: tuple[str, ...] = LAYERS) -> list[list[str]]:
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.+)$", text, re.M))
    return [args for stamp in layers for args in _pip_installs(_makefile_layer(stamp)[1], variables)]


def test_make_demo_installs_only_the_demo_layer_and_make_test_adds_the_rest():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: \$\(DEMO_STAMP\)$", text, re.M) and re.search(r"^test: \$\(TEST_STAMP\)$", text, re.M)
    assert "$(DEMO_STAMP)" in _makefile_layer("TEST_STAMP")[0].split()  # test adds to demo, never repeats it
    demo = [a for args in _makefile_setup_installs(("DEMO_STAMP",)) for a in args]
    assert "." in demo and not [a for a in demo if a.startswith((".[", "deepspeed"))], demo
    demo_lines = "\n".join(_makefile_layer("DEMO_STAMP")[1])
    assert "build_llama_cpp.sh" not in demo_lines and "install_system_libs.sh demo" in demo_lines
    test_lines = "\n".join(_makefile_layer("TEST_STAMP")[1])
    assert "build_llama_cpp.sh" in test_lines and "install_system_libs.sh test" in test_lines
    test = [a for args in _makefile_setup_installs(("TEST_STAMP",)) for a in args]
    assert ".[all]" in test and "deepspeed>=0.15" in test, test
    # .ci/run calls the README's test command, which now installs every layer.
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()


def _dockerfile() -> tuple[str, list[str]]:
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    logical = re.sub(r"\\\n", " ", text).splitlines()
    runs = [line[len("RUN ") :] for line in logical if line.startswith("RUN ")]
    commands = [c for run in runs for c in run.split("&&")]
    return text, _pip_installs(commands, args)


def test_dockerfile_runs_every_install_of_make_setup():
    wanted = _makefile_setup_installs()
    # torch, the package, the embedded model; the package with its extras, DeepSpeed
    assert len(wanted) >= 5, wanted
    _, installs = _dockerfile()
    for args in wanted:
        flags = [a for a in args if a.startswith("-")]
        packages = [a for a in args if not a.startswith("-")]
        matching = [i for i in installs if set(packages) <= set(i)]
        assert matching, f"make setup installs {packages} but the Dockerfile does not"
        assert any(set(flags) <= set(i) for i in matching), f"{packages}: the Dockerfile lacks {flags}"


def test_dockerfile_is_cuda_runtime_with_the_pinned_torch():
    text, installs = _dockerfile()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base and re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    torch_pin = next(a for args in _makefile_setup_installs() for a in args if a.startswith("torch=="))
    assert [torch_pin] in [[a for a in i if a.startswith("torch")] for i in installs]
    # `docker exec ai-ft-container python ...` must find the environment's python, in the repo folder.
    assert re.search(r"^\s*PATH=/opt/venv/bin:\$PATH", text, re.M) and "WORKDIR /workspace" in text


def test_dockerfile_installs_the_system_libraries_setup_installs():
    script = (ROOT / "setup/install_system_libs.sh").read_text()
    wanted = re.findall(r'^\s*apt_install (\S+) "([^"]*)"', script, re.M)
    assert wanted
    text = (ROOT / "Dockerfile").read_text()
    for package, why in wanted:
        if "test" not in why:  # chromium only renders a report in the test suite
            assert re.search(rf"apt-get install[^\n]*(\\\n[^\n]*)*\b{re.escape(package)}\b", text), package


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_names_the_service_and_container(compose):
    service = compose["services"][SERVICE]
    assert service["container_name"] == SERVICE
    assert service["build"]["context"] == "." and service["build"]["dockerfile"] == "Dockerfile"
    assert service["working_dir"] == "/workspace"


def test_compose_reserves_the_gpus(compose):
    devices = compose["services"][SERVICE]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d["count"] == "all" for d in devices)
    assert compose["services"][SERVICE]["shm_size"]  # NCCL needs more than Docker's 64 MB /dev/shm


def test_compose_reads_env_and_mounts_outputs_and_hf_cache(compose):
    service = compose["services"][SERVICE]
    assert any(e["path"] == ".env" and e["required"] is False for e in service["env_file"])
    mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])  # target -> source
    assert mounts["/workspace/outputs"] == "./outputs"
    hf_home = service["environment"]["HF_HOME"]
    assert mounts[hf_home] in compose["volumes"], "the HF cache is a named volume, kept across containers"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"HF_HOME={hf_home}" in dockerfile and f"AIFT_HOME={service['environment']['AIFT_HOME']}" in dockerfile
    assert mounts[service["environment"]["AIFT_HOME"]] in compose["volumes"]


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern that matches a folder covers its content."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_outputs_out_but_the_code_in():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (
        ".env",
        ".venv/bin/python",
        "outputs/run/final/adapter_model.safetensors",
        ".git/HEAD",
        "datasets/json_smollm2-135m-instruct_all/prepare.json",
        "src/aift/__pycache__/x.pyc",
    ):
        assert _docker_ignored(path, patterns), path
    for path in (
        "pyproject.toml",
        "README.md",
        "src/aift/__init__.py",
        "scripts/train_sft.py",
        "datasets/prepare_custom_dataset.py",
        "configs/ds_config_7b.json",
        "data/ja_qa.json",
        "setup/install_system_libs.sh",
        ".env.example",
    ):
        assert not _docker_ignored(path, patterns), path
        assert (ROOT / path).exists(), path
