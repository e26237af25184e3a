"""`aift generate --model M [--adapter DIR] --prompt TEXT`: one answer, streamed as it is made."""

from __future__ import annotations

import argparse
import sys

from aift.data.formats import FORMAT_CHOICES


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and chat."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model, merged or quantized folder")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to apply")
    parser.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="prompt format (auto: as trained)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the instruction or question")


def load_from_args(args: argparse.Namespace):
    """(LoadedModel, GenerationSettings) from the shared options."""
    from aift.inference.runner import GenerationSettings, load_for_inference

    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    loaded = load_for_inference(
        args.model, args.adapter, args.device, prompt_format=args.format, trust_remote_code=args.trust_remote_code
    )
    if args.system:
        loaded.system = args.system
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.greedy)
    return loaded, settings


def run(args: argparse.Namespace) -> int:
    from aift.inference.runner import stream_answer

    loaded, settings = load_from_args(args)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream_answer(loaded, [{"role": "user", "content": args.prompt}], settings, on_text=show)
    sys.stdout.write("\n")
    return 0
