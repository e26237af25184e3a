"""Starting `aift train` on several processes and nodes with torchrun, and the errors clusters produce.

``aift train ... --nproc-per-node 2`` resolves its configuration once (YAML, overrides, flags), writes it to
``OUTPUT_DIR/launch.yaml`` and runs ``python -m torch.distributed.run ... -m aift train OUTPUT_DIR/launch.yaml``:
every process reads exactly the same settings. Data preparation (``aift prepare``) happens before launch, so
no process waits at a collective barrier while another tokenizes.

What goes wrong on clusters, caught here with a message that says what to do:
- the master port is taken (another run, a stale process): checked before launch on node 0;
- a node cannot reach the master: node ranks > 0 wait for ``MASTER_ADDR:PORT`` up to the rendezvous timeout,
  then fail naming the address they tried;
- world sizes that disagree (``world_size`` in the config vs the processes started; nodes started with
  different ``--nnodes``): checked in every process before training.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from aift.errors import AiftError
from aift.utils.files import write_text_atomic

DEFAULT_RDZV_TIMEOUT_S = 600  # torchrun's own default for the static rendezvous


class LaunchError(AiftError, RuntimeError):
    """Processes could not be started or could not find each other."""


class PortInUseError(LaunchError):
    """The master port is already bound on this machine."""


class RendezvousTimeoutError(LaunchError):
    """A node could not reach the master within the timeout."""


class WorldSizeMismatchError(LaunchError):
    """The number of processes differs from what the config or the other nodes expect."""


@dataclass
class LaunchOptions:
    """Where and how many processes to start (torchrun's static rendezvous)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (single node only)
    rdzv_timeout_s: int = DEFAULT_RDZV_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise LaunchError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(
                f"--node-rank must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}, got {self.node_rank}"
            )
        if self.nnodes > 1 and self.master_port is None:
            raise LaunchError("with --nnodes > 1 every node needs the same --master-port: pass one (e.g. 29500)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise LaunchError(f"--master-port must be in 1..65535, got {self.master_port}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "") -> bool:
    """Whether binding ``port`` fails here (someone else holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_master_port(options: LaunchOptions) -> None:
    """On node 0, the master port must be free (torchrun binds it for the rendezvous store)."""
    if options.node_rank == 0 and options.master_port is not None and port_in_use(options.master_port):
        raise PortInUseError(
            f"port {options.master_port} is already in use on this machine (another training run, or a process "
            f"left over from one?): pick another with --master-port, pass the same one to every node, "
            f"or omit it on a single node to use a free port"
        )


def wait_for_master(addr: str, port: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Blocks until ``addr:port`` accepts a TCP connection; a clear error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            last_error = e
            time.sleep(poll_s)
    raise RendezvousTimeoutError(
        f"could not reach the master at {addr}:{port} within {timeout_s:g} s ({last_error}): check that node 0 "
        f"was started with the same --master-addr/--master-port, that {addr} is this cluster's address of node 0 "
        f"(not 127.0.0.1 across machines), and that port {port} is open between the nodes"
    )


def torchrun_command(options: LaunchOptions, module_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run ... -m aift <module_args>`` for this node."""
    port = options.master_port if options.master_port is not None else find_free_port(options.master_addr)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={options.nproc_per_node}",
        f"--nnodes={options.nnodes}",
        f"--node-rank={options.node_rank}",
        f"--master-addr={options.master_addr}",
        f"--master-port={port}",
        f"--rdzv-conf=timeout={options.rdzv_timeout_s}",
        "--max-restarts=0",
        "-m",
        "aift",
        *module_args,
    ]


def under_launcher() -> bool:
    """Whether this process was started by torchrun / accelerate launch / deepspeed (they set these)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_world_size(expected: int | None) -> None:
    """Fails early when the processes started differ from what the config asks for.

    Args:
        expected: ``world_size`` from the config when the user set it (> 1), else None.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if expected and expected > 1 and expected != world:
        raise WorldSizeMismatchError(
            f"the config asks for world_size={expected} but {world} process(es) were started "
            f"(WORLD_SIZE={world}): start {expected} processes (nnodes x nproc-per-node) or remove world_size "
            "from the config (the launcher sets it)"
        )
    local, nodes = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("GROUP_WORLD_SIZE")
    if local and nodes and int(local) * int(nodes) != world:
        raise WorldSizeMismatchError(
            f"{nodes} node(s) x {local} process(es) per node != WORLD_SIZE {world}: start every node with the same "
            "--nnodes and --nproc-per-node"
        )
    check_local_rank_has_a_gpu()
    if world > 1 and "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        _compare_with_rank0(world, int(os.environ["RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))


def check_local_rank_has_a_gpu() -> None:
    """Fails when this process's LOCAL_RANK has no GPU: more processes per node were started than it has GPUs.

    The usual cause is a per-node count given as a total (``deepspeed --num_gpus 64`` on 8-GPU nodes); each
    surplus rank would otherwise die in CUDA with "invalid device ordinal".
    """
    import torch

    local = os.environ.get("LOCAL_RANK")
    if local is None or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if int(local) >= count:
        raise WorldSizeMismatchError(
            f"LOCAL_RANK={local} but this node has {count} GPU(s): the launcher started more processes per node "
            f"than there are GPUs. deepspeed's --num_gpus and torchrun's --nproc-per-node count GPUs per node "
            f"(8 nodes x 8 GPUs: deepspeed --num_nodes 8 --num_gpus 8, or just --hostfile with slots=8)"
        )


def _compare_with_rank0(world: int, rank: int, addr: str, port: int, timeout_s: float = 120) -> None:
    """Each process publishes its WORLD_SIZE in the launcher's store and compares it with rank 0's.

    Nodes started with different --nnodes would otherwise each wait for a different number of peers until
    the collective timeout, with no hint why.
    """
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    store.set(f"aift/world_size/{rank}", str(world))
    try:
        first = int(store.get("aift/world_size/0"))
    except RuntimeError as e:  # rank 0 never came: it expects a world without this rank
        raise WorldSizeMismatchError(
            f"rank {rank} saw no rank 0 in {timeout_s:g} s at {addr}:{port}: the nodes may disagree on --nnodes "
            f"(this node computed WORLD_SIZE={world})"
        ) from e
    if first != world:
        raise WorldSizeMismatchError(
            f"this process has WORLD_SIZE={world} but rank 0 has {first}: start every node with the same --nnodes "
            "and --nproc-per-node"
        )


def run_launch(options: LaunchOptions, module_args: list[str], timeout_s: float | None = None) -> int:
    """Starts this node's processes and waits; failures get a message naming the likely cause."""
    if under_launcher():
        raise LaunchError(
            "already running under a launcher (LOCAL_RANK and WORLD_SIZE are set): drop --nproc-per-node, "
            "or start `aift train --nproc-per-node N` from a plain shell"
        )
    check_master_port(options)
    if options.node_rank > 0:
        wait_for_master(options.master_addr, options.master_port, options.rdzv_timeout_s)
    command = torchrun_command(options, module_args)
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        try:
            for line in proc.stderr:  # shown as it comes, kept to explain a failure
                sys.stderr.write(line)
                tail.append(line)
            code = proc.wait(timeout=timeout_s)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.terminate()
            proc.wait(timeout=60)
            raise
    if code != 0:
        raise explain_failure(code, "".join(tail), options, command)
    return 0


def explain_failure(code: int, stderr_tail: str, options: LaunchOptions, command: list[str]) -> LaunchError:
    """The launcher's exit status and last stderr lines -> one error saying what to do."""
    address = f"{options.master_addr}:{_port_of(command)}"
    text = stderr_tail.lower()
    if "address already in use" in text or "eaddrinuse" in text:
        return PortInUseError(f"port {_port_of(command)} became busy while starting: pick another --master-port")
    if "timed out" in text or ("timeout" in text and "rendezvous" in text):
        return RendezvousTimeoutError(
            f"the processes could not meet at {address} within {options.rdzv_timeout_s} s: every node must be started "
            f"with --nnodes {options.nnodes} and the same --master-addr/--master-port, and reach {address}"
        )
    if "world_size" in text and "mismatch" in text:
        return WorldSizeMismatchError("the nodes disagree on the world size: start every node with the same flags")
    last = next((line for line in reversed(stderr_tail.splitlines()) if "Error" in line), "")
    return LaunchError(
        f"training processes failed (exit status {code}){': ' + last.strip() if last else ''}; "
        "the messages of each rank are above"
    )


def _port_of(command: list[str]) -> str:
    return next((a.split("=", 1)[1] for a in command if a.startswith("--master-port=")), "?")


def write_launch_config(path: Path, text: str) -> Path:
    """The resolved configuration every process reads, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def add_launch_arguments(parser) -> None:
    """`aift train`'s flags for starting several processes (and nodes)."""
    import argparse

    group = parser.add_argument_group("multi-process / multi-node (torchrun)")
    group.add_argument("--nproc-per-node", type=int, default=None, help="Start N training processes on this node.")
    group.add_argument("--nnodes", type=int, default=1, help="Number of nodes (machines) taking part.")
    group.add_argument("--node-rank", type=int, default=0, help="This node's rank, 0..nnodes-1 (0 hosts the master).")
    group.add_argument("--master-addr", default="127.0.0.1", help="Address of node 0, reachable from every node.")
    group.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="Port on node 0 (default: a free one; required with --nnodes > 1).",
    )
    group.add_argument(
        "--rdzv-timeout", type=int, default=DEFAULT_RDZV_TIMEOUT_S, help="Seconds to wait for the other nodes."
    )
    # The deepspeed launcher appends --local_rank=N to the script's arguments (LOCAL_RANK is in the env too).
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument(
        "--strategy",
        default=None,
        choices=("ddp", "fsdp", "deepspeed", "model_parallel", "pipeline"),
        help="How to spread training over devices (default: ddp when several processes run).",
    )
    group.add_argument(
        "--max-memory-per-gpu", default=None, metavar="MAP", help="model_parallel budgets, e.g. '{0: 22GB, 1: 22GB}'."
    )


def launch_options(args) -> LaunchOptions:
    return LaunchOptions(
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        rdzv_timeout_s=args.rdzv_timeout,
    )


def launch_training(options: LaunchOptions, configs, merge: bool = False) -> int:
    """Writes the resolved configs (a TrainConfigs) for every process and starts them on this node."""
    import dataclasses

    import yaml

    check_master_port(options)  # before writing anything
    values = dataclasses.asdict(configs.training)
    values["world_size"] = options.world_size  # every process checks it against what really started
    if configs.lora is not None:
        values["lora"] = dataclasses.asdict(configs.lora)
    if configs.preference is not None:
        values["preference"] = dataclasses.asdict(configs.preference)
    if configs.grpo is not None:
        values["method"], values["grpo"] = "grpo", dataclasses.asdict(configs.grpo)
    out = Path(configs.training.output_dir)
    path = write_launch_config(
        out / f"launch-node{options.node_rank}.yaml", yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    )
    return run_launch(options, ["train", str(path), *(["--merge"] if merge else [])])
