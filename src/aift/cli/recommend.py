"""`aift recommend --gpu-memory GB [--gpus N]`: a model and method for the hardware, and why."""

from __future__ import annotations

import argparse

from aift.models.registry import recommend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GB")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs")


def run(args: argparse.Namespace) -> int:
    rec = recommend(args.gpu_memory, args.gpus)
    print(f"model:  {rec.model}\nmethod: {rec.method}\nwhy:    {rec.reason}")
    return 0
