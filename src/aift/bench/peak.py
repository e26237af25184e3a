"""The machine's matrix-multiply peak, and the model FLOPs a training step needs: the two halves of MFU.

MFU (model FLOPs utilisation) = model FLOPs of the tokens trained / wall time / matmul peak.
Model FLOPs count each multiply-add as 2 FLOPs over the model's matmul weights:
  forward 2 * P per token, backward through activations 2 * P, backward to the weights 2 * P_trained,
so a LoRA step costs 4 * P per token (the adapters are under 2 % of P and left out) and full
fine-tuning 6 * P. The output projection (V x H) is counted only for positions that have a target,
since the fused loss skips the others; attention's score FLOPs are left out. Both choices make MFU
an underestimate rather than flattery.
"""

from __future__ import annotations

import time

import torch


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 1.5, device: str | None = None) -> float:
    """Best sustained GFLOP/s of ``size x size`` torch.matmul in ``dtype`` over about ``seconds``, on ``device``
    (default: the GPU when there is one, as the bench trains there; else the CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.matmul(a, b, out=out)  # warm-up: thread pool, kernel selection
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(3):
            torch.matmul(a, b, out=out)
        _sync(device)  # a GPU runs the matmuls asynchronously: time them, not their launch
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * size**3 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(body, head): weights of the matmuls before the output projection, and of the output projection.

    The input embedding is a lookup, not a matmul; with tied embeddings its matrix is the head.
    """
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    seen = {id(head), id(embed)}
    body = 0
    for p in model.parameters():
        if id(p) not in seen and p.dim() >= 2:  # matrices only; norms and biases are not matmul weights
            seen.add(id(p))
            body += p.numel()
    return body, head.numel()


def model_flops(body_params: int, head_params: int, tokens: int, scored_tokens: int, full: bool) -> float:
    """Model FLOPs of training on ``tokens`` tokens of which ``scored_tokens`` have a target (see module doc)."""
    per_param = 6 if full else 4
    return per_param * (body_params * tokens + head_params * scored_tokens)
