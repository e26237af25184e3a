"""Launch command, and the errors users hit on clusters (port in use, unreachable master, world size mismatch)."""

from __future__ import annotations

import socket
import sys

import pytest

from aift.cli import main
from aift.distributed.launch import (
    LaunchError,
    LaunchOptions,
    PortInUseError,
    RendezvousTimeoutError,
    WorldSizeMismatchError,
    check_master_port,
    check_world_size,
    explain_failure,
    find_free_port,
    port_in_use,
    run_launch,
    torchrun_command,
    wait_for_master,
)


@pytest.fixture
def busy_port():
    """A port someone listens on for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_torchrun_command_for_two_nodes():
    options = LaunchOptions(nproc_per_node=2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29555)
    command = torchrun_command(options, ["train", "run.yaml"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command and "--nnodes=2" in command and "--node-rank=1" in command
    assert "--master-addr=10.0.0.1" in command and "--master-port=29555" in command
    assert command[-4:] == ["-m", "aift", "train", "run.yaml"]
    assert options.world_size == 4


def test_single_node_picks_a_free_port():
    command = torchrun_command(LaunchOptions(nproc_per_node=2), ["train"])
    port = int(next(a for a in command if a.startswith("--master-port=")).split("=")[1])
    assert not port_in_use(port)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nproc_per_node": 0}, "--nproc-per-node must be >= 1"),
        ({"nnodes": 2, "node_rank": 2, "master_port": 29500}, "--node-rank must be in 0..1"),
        ({"nnodes": 2}, "needs the same --master-port"),
        ({"master_port": 70000}, "--master-port must be in"),
    ],
)
def test_bad_launch_options(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        LaunchOptions(**kwargs)


def test_port_in_use_is_reported_before_launch(busy_port):
    assert port_in_use(busy_port)
    with pytest.raises(PortInUseError, match=f"port {busy_port} is already in use"):
        check_master_port(LaunchOptions(nproc_per_node=2, master_port=busy_port))
    check_master_port(LaunchOptions(nproc_per_node=2, master_port=find_free_port()))  # a free one passes


def test_cli_port_in_use_is_a_clear_error(busy_port, capsys, tmp_path):
    code = main(["train", "--output-dir", str(tmp_path), "--nproc-per-node", "2", "--master-port", str(busy_port)])
    assert code == 2
    assert f"port {busy_port} is already in use" in capsys.readouterr().err


def test_unreachable_master_times_out_naming_the_address():
    port = find_free_port()  # nobody listens there
    with pytest.raises(RendezvousTimeoutError, match=f"127.0.0.1:{port} within 1 s"):
        wait_for_master("127.0.0.1", port, timeout_s=1, poll_s=0.2)


def test_reachable_master_passes(busy_port):
    wait_for_master("127.0.0.1", busy_port, timeout_s=5)


def test_world_size_from_config_must_match_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(WorldSizeMismatchError, match="world_size=4 but 2 process"):
        check_world_size(4)
    check_world_size(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.raises(WorldSizeMismatchError, match="2 node"):
        check_world_size(None)


def test_nested_launch_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="already running under a launcher"):
        run_launch(LaunchOptions(nproc_per_node=2), ["train"])


def test_failures_are_explained():
    options = LaunchOptions(nproc_per_node=1, nnodes=2, node_rank=1, master_addr="10.1.2.3", master_port=29501)
    command = torchrun_command(options, ["train"])
    timeout = explain_failure(1, "torch.distributed.DistNetworkError: ... timed out after 600s", options, command)
    assert isinstance(timeout, RendezvousTimeoutError) and "10.1.2.3:29501" in str(timeout)
    busy = explain_failure(1, "RuntimeError: Address already in use", options, command)
    assert isinstance(busy, PortInUseError)
    other = explain_failure(3, "ValueError: something else\n", options, command)
    assert "exit status 3" in str(other) and "ValueError" in str(other)


def test_deepspeed_launchers_local_rank_argument_is_accepted(capsys):
    """`deepspeed --module aift train ...` runs `python -m aift --local_rank=N train ...`."""
    assert main(["--local_rank=1", "--version"]) == 0
    assert capsys.readouterr().out.startswith("aift ")
