"""What every benchmark process measures the same way: peak memory, the allocator, and the held-out loss."""

from __future__ import annotations

import time

import torch

from aift.training.loss import fused_linear_cross_entropy, split_causal_lm
from aift.utils.allocator import tcmalloc_mapped
from aift.utils.gpu import peak_memory_gb

PRECISIONS = ("auto", "bf16", "fp32")


def bench_precision(requested: str = "auto") -> str:
    """The precision both trainers of a benchmark run in: "auto" is bf16 where aift itself would train in bf16.

    That is :func:`aift.training.backends.resolve_precision`'s rule: bf16 on a GPU with bf16 and on a CPU with
    AVX512-BF16/AMX; fp32 on a CPU that would emulate bf16 (about 1/60 of its fp32 speed) and, for the bench,
    on a GPU without bf16. TRL is then given the same, so that neither side pays for the other's precision.
    """
    from aift.errors import AiftError

    if requested not in PRECISIONS:
        raise AiftError(f"--precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return requested
    return "bf16" if device_has_bf16() else "fp32"


def device_has_bf16() -> bool:
    """Whether aift trains in bf16 on this machine's device (the GPU if there is one, else the CPU)."""
    from aift.config import TrainingConfig
    from aift.training.backends import resolve_precision

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_precision(TrainingConfig(bf16=True), device_type) == "bf16"


def allocator() -> str:
    return "tcmalloc" if tcmalloc_mapped() else "system"


def timed_train(trainer):
    """A TRL trainer's ``train()``: (its output, seconds it took, this process's peak memory in GB after it)."""
    started = time.perf_counter()
    output = trainer.train()
    return output, time.perf_counter() - started, peak_memory_gb()


def process_facts() -> dict:
    return {"allocator": allocator(), "threads": torch.get_num_threads()}


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, examples: list[list[int]], bf16: bool = True) -> float:
    """Mean next-token cross-entropy over every token of the held-out examples (one example at a time).

    Computed identically for both trainers' models, in bf16 autocast when both trained so (else fp32),
    through the chunked loss so that evaluation never raises the process's peak memory above training's.
    """
    was_training = model.training
    model.eval()
    decoder, head = split_causal_lm(model)
    device = head.weight.device
    total, count = 0.0, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for ids in examples:
            input_ids = torch.tensor([ids], device=device)
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            total += fused_linear_cross_entropy(hidden, head.weight, input_ids, chunk_size=256).item()
            count += len(ids) - 1
    model.train(was_training)
    return total / max(count, 1)
