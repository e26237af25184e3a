"""Attention over packed rows computed one packed example at a time: no work across examples.

With packing, a row holds several examples; SDPA keeps them apart with a block-diagonal 4-D mask, but its
CPU kernels still compute every (query block, key block) pair the mask then throws away, and cannot skip
the upper triangle as they do with ``is_causal``. Here each example (a *segment*: a run of positions that
starts at ``position_ids == 0``) gets its own causal attention, so the cost follows the sum of the
squared example lengths, not the squared row length. In bf16, short segments use two batched matmuls and a
softmax (faster than the flash kernel's fixed costs on an AVX512-BF16 CPU); long ones, and every segment in
fp32 (where the flash kernel wins at every length), use SDPA with ``is_causal``. The matmul path's softmax
runs in the scores' dtype (bf16 under autocast; PyTorch accumulates it in fp32) and keeps only that for
backward: measured against an fp32 run, the gradients are as close as with an fp32 softmax, and peak
memory is 12 % lower.

Registered with transformers' ``AttentionInterface`` under :data:`IMPLEMENTATION` (and a mask function
that builds no block mask, as for flash-attention; right padding is ignored, since causal attention never
looks ahead at it), and switched on by the training loop for packed batches on
a CPU only: it is a training kernel (no KV cache, no sliding window, no soft-capping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aift.errors import AiftError

IMPLEMENTATION = "aift_segment"
# Up to this many tokens a segment is computed with explicit matmuls, above it with SDPA (flash, is_causal), by
# the dtype of the scores. In fp32 SDPA is faster at every length (forward + backward of 9 query / 3 key heads
# of 64, 2-core AVX2 CPU: 0.75 vs 0.99 ms at 64 tokens, 5.1 vs 7.1 at 220, 15 vs 21 at 400) and keeps no scores.
MATMUL_MAX_LEN = {torch.float32: 0}
DEFAULT_MATMUL_MAX_LEN = 512  # bf16: the matmuls win up to here (measured on an AVX512-BF16 CPU)

_cache: dict[str, object] = {}  # the last position_ids seen and their segments: every layer shares them


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, T, D], key/value [B, KV, T, D] -> ([B, T, H, D], None)."""
    _check_supported(module, query, key, attention_mask, kwargs)
    batch, heads, length, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    dropout = dropout if module.training else 0.0
    rows = []
    for b, spans in enumerate(_segments(kwargs.get("position_ids"), batch, length)):
        parts = [
            _causal_attention(query[b, :, s:e], key[b, :, s:e], value[b, :, s:e], scaling, dropout) for s, e in spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.stack(rows).transpose(1, 2), None


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, dropout: float):
    """Causal attention of one segment: q [H, L, D], k/v [KV, L, D] -> [H, L, D]; GQA without repeating k/v."""
    heads, length, dim = q.shape
    kv_heads = k.shape[0]
    if length > MATMUL_MAX_LEN.get(q.dtype, DEFAULT_MATMUL_MAX_LEN):
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=True
        )
        return out[0]
    group = heads // kv_heads
    # The query heads that share a key head are stacked along the sequence: one bmm per key head.
    q_grouped = (q * scaling).reshape(kv_heads, group * length, dim)
    scores = torch.bmm(q_grouped, k.transpose(1, 2)).view(kv_heads, group, length, length)
    scores = scores.masked_fill_(_upper_triangle(length, q.device), float("-inf"))  # bmm keeps no output
    probs = torch.softmax(scores, dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.bmm(probs.view(kv_heads, group * length, length), v)
    return out.view(heads, length, dim)


def _upper_triangle(length: int, device: torch.device) -> torch.Tensor:
    key = (length, str(device))
    masks = _cache.setdefault("masks", {})
    if key not in masks:
        masks[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return masks[key]


def _segments(position_ids: torch.Tensor | None, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each segment: a new one wherever position_ids restarts at 0."""
    if position_ids is None:
        return [[(0, length)]] * batch
    if _cache.get("position_ids") is position_ids:
        return _cache["segments"]
    ids = position_ids.expand(batch, -1)
    starts = (ids == 0).clone()
    starts[:, 0] = True
    spans = []
    for row in starts.cpu().tolist():
        begin = [i for i, s in enumerate(row) if s]
        spans.append(list(zip(begin, begin[1:] + [length], strict=True)))
    _cache["position_ids"], _cache["segments"] = position_ids, spans
    return spans


def _check_supported(module, query, key, attention_mask, kwargs) -> None:
    if attention_mask is not None and not _right_padded(attention_mask):
        raise AiftError(
            f"{IMPLEMENTATION} attention takes packed rows marked by position_ids, or right-padded rows; "
            f"got an attention mask of shape {tuple(attention_mask.shape)} that is neither"
        )
    if query.shape[2] != key.shape[2]:
        raise AiftError(f"{IMPLEMENTATION} attention is a training kernel: it has no KV cache (use sdpa to generate)")
    if not getattr(module, "is_causal", True):
        raise AiftError(f"{IMPLEMENTATION} attention is causal only")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise AiftError(f"{IMPLEMENTATION} attention does not support {name}: train this model with sdpa")


def _right_padded(mask: torch.Tensor) -> bool:
    """A [B, T] padding mask whose padding is all at the end of each row: causal attention never sees it."""
    if mask.dim() != 2:
        return False
    real = mask.bool()
    return bool((real[:, 1:] <= real[:, :-1]).all())


def register() -> str:
    """Registers the implementation with transformers (idempotent) and returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, segment_attention_forward)
    # As for flash-attention: no mask when nothing is padded, else the 2-D padding mask (checked above).
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)
    return IMPLEMENTATION


class PackedAttention:
    """How packed rows keep their examples apart, chosen from the model's attention implementation.

    flash-attention reads the examples from ``position_ids`` (no mask); SDPA on a CPU switches, for the run,
    to aift's segment attention (``config.segment_attention``), which does the same; anything else gets
    the 4-D block-causal mask. Used as a context around training and eval: the model's own implementation
    is back on exit, before the final model is saved (its config.json must not name aift's).
    """

    def __init__(self, model: torch.nn.Module, config, device_type: str) -> None:
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.original = getattr(self.model.config, "_attn_implementation", None) or "eager"
        self.implementation, self.mask = self.original, "4d"
        if not config.packing:
            return
        if self.original.startswith("flash_attention"):
            self.mask = "position_ids"
        elif config.segment_attention and device_type == "cpu" and self.original == "sdpa":
            self.implementation, self.mask = register(), "position_ids"

    def __enter__(self) -> PackedAttention:
        if self.implementation != self.original:
            self.model.set_attn_implementation(self.implementation)
        return self

    def __exit__(self, *exc) -> None:
        if self.implementation != self.original:
            self.model.set_attn_implementation(self.original)
