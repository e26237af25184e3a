"""`aift plan`'s memory for 8B and 32B models on 1, 2 and 8 GPUs: the tables of docs/scaling.md.

    python bench/plan/scaling.py     # a few seconds: only configs are read (bench/plan/configs/)

Writes bench/results/plan/scaling.json and prints the markdown tables. GB here are GiB (2**30 bytes), as
`aift plan` and nvidia-smi print them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "bench" / "results" / "plan"
MODELS = {"Llama-3-8B": HERE / "configs" / "llama-3-8b", "Qwen2.5-32B": HERE / "configs" / "qwen2.5-32b-instruct"}
METHODS = ("full", "lora", "qlora")
SETTINGS = ((1, 512), (1, 2048), (4, 2048))  # (micro-batch, tokens per row); checkpointing on, bf16, r=16
STRATEGIES = ("ddp", "zero2", "fsdp / zero3")


def per_gpu(model: Path, method: str, gpus: int, batch: int, length: int) -> dict[str, float]:
    """GiB per GPU: the whole model on one GPU, else each data-parallel strategy (its per-GPU share)."""
    from aift.distributed.planning import GB, plan_training

    plan = plan_training(
        str(model), gpus=gpus, gpu_memory_gb=100_000, method=method, batch_size=batch, max_length=length
    )
    if gpus == 1:
        return {"one GPU": plan.devices[0].needed / GB}
    return {name: plan.per_gpu_by_strategy[name] / GB for name in STRATEGIES}


def rows() -> list[dict]:
    out = []
    for name, path in MODELS.items():
        for batch, length in SETTINGS:
            for method in METHODS:
                row = {"model": name, "method": method, "batch_size": batch, "max_length": length}
                for gpus in (1, 2, 8):
                    row[f"{gpus} GPU"] = per_gpu(path, method, gpus, batch, length)
                out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    head = "| model | batch x length | method | 1 GPU | 2 GPUs ddp / zero2 / zero3 | 8 GPUs ddp / zero2 / zero3 |"
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in table:
        two = " / ".join(f"{r['2 GPU'][s]:.1f}" for s in STRATEGIES)
        eight = " / ".join(f"{r['8 GPU'][s]:.1f}" for s in STRATEGIES)
        lines.append(
            f"| {r['model']} | {r['batch_size']} x {r['max_length']} | {r['method']} "
            f"| {r['1 GPU']['one GPU']:.1f} | {two} | {eight} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    table = rows()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
