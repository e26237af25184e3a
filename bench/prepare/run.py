"""`aift prepare` speed against a plain `datasets.map` tokenization of the same rows, in one run.

    OMP_NUM_THREADS=1 python bench/prepare/run.py [--rows 20000] [--num-proc N] [--max-length 512]

Both sides start from the same generated alpaca-shaped JSON file and the embedded model's tokenizer, and end
with a dataset saved to disk: aift through `prepare_dataset` (what `aift prepare` calls: render, loss masks,
drops, split, prepare.json), the baseline through `load_dataset("json")` -> `Dataset.map(batched=True,
num_proc=N)` of the chat template and a batched tokenizer call -> `save_to_disk`. Writes result.json and
results.md beside this file (or --out), with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
MODEL = "smollm2-135m-instruct"
TARGET = 1.3  # aift may take at most this many times the baseline's wall time
WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "token",
    "answer",
    "question",
    "river",
    "mountain",
    "city",
    "light",
    "small",
    "large",
    "quick",
    "slow",
]


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic alpaca rows (instruction/input/output) of varied length; a third have an input."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {"instruction": text(5, 30), "input": text(5, 60) if i % 3 == 0 else "", "output": text(10, 150)}
        for i in range(n)
    ]


def run_aift(path: Path, out: Path, num_proc: int, max_length: int) -> float:
    from aift.data.prepare import prepare_dataset

    start = time.perf_counter()
    prepare_dataset(MODEL, "json", path, output_dir=out, max_length=max_length, val_ratio=0.05, num_proc=num_proc)
    return time.perf_counter() - start


def run_baseline(path: Path, out: Path, num_proc: int, max_length: int) -> float:
    from datasets import load_dataset

    from aift.models.loading import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(MODEL)

    def tokenize(batch):
        texts = [
            tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": f"{q}\n\n{x}".strip()},
                    {"role": "assistant", "content": a},
                ],
                tokenize=False,
            )
            for q, x, a in zip(batch["instruction"], batch["input"], batch["output"], strict=True)
        ]
        return tokenizer(texts, truncation=True, max_length=max_length)

    data = load_dataset("json", data_files=str(path), split="train")
    data = data.map(
        tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=data.column_names
    )
    data.save_to_disk(str(out))
    return time.perf_counter() - start


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for result.json and results.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "alpaca.json"
        source.write_text(json.dumps(alpaca_rows(args.rows)), encoding="utf-8")
        base_s = run_baseline(source, Path(tmp) / "baseline", args.num_proc, args.max_length)
        aift_s = run_aift(source, Path(tmp) / "aift", args.num_proc, args.max_length)
    result = {
        "rows": args.rows,
        "num_proc": args.num_proc,
        "max_length": args.max_length,
        "aift": {"seconds": round(aift_s, 3), "rows_per_s": round(args.rows / aift_s, 1)},
        "baseline_datasets_map": {"seconds": round(base_s, 3), "rows_per_s": round(args.rows / base_s, 1)},
        "time_ratio_aift_over_baseline": round(aift_s / base_s, 3),
        "target_max_ratio": TARGET,
        "meets_target": aift_s / base_s <= TARGET,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "result.json", json.dumps(result, indent=2) + "\n")
    write_atomic(args.out / "results.md", report(result))
    print(json.dumps(result, indent=2))


def report(r: dict) -> str:
    return (
        f"# `aift prepare` vs plain `datasets.map` ({r['rows']} alpaca rows, num_proc {r['num_proc']})\n\n"
        "| pipeline | seconds | rows/s |\n| --- | ---: | ---: |\n"
        f"| aift prepare_dataset | {r['aift']['seconds']} | {r['aift']['rows_per_s']} |\n"
        f"| load_dataset + Dataset.map + save_to_disk | {r['baseline_datasets_map']['seconds']} "
        f"| {r['baseline_datasets_map']['rows_per_s']} |\n\n"
        f"aift / baseline time: {r['time_ratio_aift_over_baseline']} (target <= {r['target_max_ratio']}: "
        f"{'met' if r['meets_target'] else 'not met'}). Load average before {r['load_average_before']}, "
        f"after {r['load_average_after']}; {r['cpu_count']} cores.\n"
    )


if __name__ == "__main__":
    main()
