"""Greedy generation throughput of aift's serving engine (aift.serve.engine) on the embedded model: the same
requests decoded one at a time (max_batch=1) and batched (max_batch=8), in one run so the ratio is fair.

    python bench/generation/run.py [--requests 8] [--max-tokens 32] [--repeats 3]

Writes result.json and results.md beside this file. Every request is queued before the worker starts, so the
batched engine really decodes them together; tokens/s = generated tokens / wall time until the last one ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from aift.inference.runner import build_prompt
from aift.models.embedded import embedded_model_dir
from aift.serve.engine import Engine, Sampling
from aift.serve.models import load_served_models

HERE = Path(__file__).parent
# Open-ended prompts of different lengths, so a batch is padded and answers rarely end early.
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through Kyoto in autumn.",
    "List many facts about the planet Mars and explain each one.",
    "Write a letter to a friend about your new job as a baker, with lots of details.",
    "Tell me about the history of tea.",
    "Describe your favourite meal and how to cook it, step by step, for a beginner.",
    "Write a poem about the sea.",
]


def measure(served, requests: int, max_tokens: int, max_batch: int) -> dict:
    engine = Engine(served, max_batch=max_batch)
    sampling = Sampling(max_tokens=max_tokens, temperature=0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    handles = [engine.submit_chat("smol", [{"role": "user", "content": p}], sampling) for p in prompts]
    start = time.perf_counter()
    engine.start()
    results = [h.result() for h in handles]
    seconds = time.perf_counter() - start
    engine.close()
    tokens = sum(r.completion_tokens for r in results)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "answers": [r.answer for r in results],
    }


@torch.no_grad()
def measure_plain_generate(served, requests: int, max_tokens: int, max_batch: int = 1) -> dict:
    """The baseline: transformers' `model.generate` (greedy, its own KV cache), one prompt at a time."""
    loaded = served[0].loaded
    model, tok = loaded.model, loaded.tokenizer
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    ids = [
        tok(build_prompt(loaded, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start, tokens = time.perf_counter(), 0
    for row in ids:
        out = model.generate(
            input_ids=torch.tensor([row]), do_sample=False, max_new_tokens=max_tokens, pad_token_id=pad
        )
        tokens += out.shape[1] - len(row)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def best_of(served, repeats: int, how=None, **kwargs) -> dict:
    runs = [(how or measure)(served, **kwargs) for _ in range(repeats)]
    return max(runs, key=lambda r: r["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for result.json and results.md")
    args = parser.parse_args()
    served = load_served_models(str(embedded_model_dir()), name="smol", device="cpu")
    measure(served, 2, 4, 2)  # warm-up
    load_before = os.getloadavg()[0]
    one = best_of(served, args.repeats, requests=1, max_tokens=args.max_tokens, max_batch=1)
    serial = best_of(served, args.repeats, requests=args.requests, max_tokens=args.max_tokens, max_batch=1)
    batched = best_of(served, args.repeats, requests=args.requests, max_tokens=args.max_tokens, max_batch=8)
    plain = best_of(
        served, args.repeats, how=measure_plain_generate, requests=args.requests, max_tokens=args.max_tokens
    )
    result = {
        "model": "SmolLM2-135M-Instruct (embedded, fp32, CPU)",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "single_request": {k: v for k, v in one.items() if k != "answers"},
        "one_at_a_time": {k: v for k, v in serial.items() if k != "answers"},
        "batched_8": {k: v for k, v in batched.items() if k != "answers"},
        "plain_model_generate_one_at_a_time": plain,
        "speedup_batched_vs_one_at_a_time": batched["tokens_per_s"] / serial["tokens_per_s"],
        "speedup_batch_1_vs_plain_generate": serial["tokens_per_s"] / plain["tokens_per_s"],
        "speedup_batch_8_vs_plain_generate": batched["tokens_per_s"] / plain["tokens_per_s"],
        "batched_answers_equal_one_at_a_time": batched["answers"] == serial["answers"],
    }
    write_atomic(args.out / "result.json", json.dumps(result, indent=2) + "\n")
    rows = [
        ("1 request alone", one),
        (f"{args.requests} requests, one at a time (max_batch=1)", serial),
        (f"{args.requests} requests, batched (max_batch=8)", batched),
        (f"{args.requests} requests, plain `model.generate` one at a time (baseline)", plain),
    ]
    table = "\n".join(f"| {name} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} |" for name, r in rows)
    write_atomic(
        args.out / "results.md",
        f"# Greedy generation: one at a time vs batched ({result['model']})\n\n"
        f"{args.max_tokens} new tokens per request, best of {args.repeats}; {result['cpus']} CPUs, "
        f"{result['torch_threads']} torch threads, load average {load_before:.1f} before, "
        f"{result['load_average_after']:.1f} after (other work on the machine slows every row).\n\n"
        "| run | tokens | seconds | tokens/s |\n| --- | --- | --- | --- |\n"
        f"{table}\n\n"
        f"Batched / one at a time: **{result['speedup_batched_vs_one_at_a_time']:.2f}x**; batched answers equal "
        f"the one-at-a-time answers: {'yes' if result['batched_answers_equal_one_at_a_time'] else 'NO'}. "
        f"Against plain `model.generate` one prompt at a time: batch 1 "
        f"**{result['speedup_batch_1_vs_plain_generate']:.2f}x**, batch 8 "
        f"**{result['speedup_batch_8_vs_plain_generate']:.2f}x**.\n",
    )
    print((args.out / "results.md").read_text(encoding="utf-8"))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
