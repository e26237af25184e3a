"""Token-level generation: a batched decoder with one KV cache, and the sampling rule every caller shares.

params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95, stop_token_ids=eos_token_ids(model, tok))
completions = generate_batch(model, [prompt_ids, other_ids], params, pad_token_id=tok.pad_token_id,
                             num_return_sequences=4, generator=torch.Generator().manual_seed(0))

Prompt formatting is data's (aift.data.formats); this module sees token ids only. `aift serve`, `aift eval`,
chat, the demo, the quantization benchmark and GRPO's rollouts all decode here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aift.errors import AiftError


@dataclass
class SamplingParams:
    """How sequences are decoded. temperature 0 is greedy (top_p and top_k then do nothing)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop_token_ids: tuple[int, ...] = ()  # EOS ids; a sequence ends at the first (which is kept in its ids)
    seed: int | None = None  # seeds a generator when the caller passes none

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise AiftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise AiftError(f"temperature must be at least 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise AiftError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise AiftError(f"top_k must be at least 0, got {self.top_k}")
        self.stop_token_ids = tuple(self.stop_token_ids)


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token from one row's last logits: argmax at temperature 0, else a draw after top-k and top-p."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = scores.topk(params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keeps the token crossing top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end an answer: the model's generation config EOS ids and the tokenizer's EOS."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return tuple(dict.fromkeys(i for i in (*ids, tokenizer.eos_token_id) if i is not None))


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with each row padded on the left to the longest."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def _forward_parameters(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(type(base).forward).parameters)


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: recent transformers call it `cache` and warn on the older
    `past_key_values` (still accepted until 5.40); the floor of our range (5.0) knows only `past_key_values`."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _last_logits_only(model) -> dict:
    """The forward argument that computes the output head on the last position only (the prefill's other
    positions predict nothing the decoder uses: a prompt of P tokens saves P - 1 head matmuls of V x H)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


NextToken = Callable[[int, torch.Tensor], "int | None"]


@torch.inference_mode()
def decode(model, prompts: list[list[int]], next_token: NextToken, *, pad_token_id: int, copies: int = 1) -> None:
    """Decodes rows together token by token with one KV cache, until every row is finished.

    `next_token(row, logits)` gets a row's index and its last logits, and returns the token to feed next, or
    None when that row is finished. Rows are left-padded: the attention mask hides the padding and the position
    ids count only real tokens, so a batched row computes what it would alone. Finished rows leave the batch (and
    the cache) at once. `copies`: each prompt is decoded that many times, as rows ``i * copies .. i * copies +
    copies - 1``; its prompt runs through the model once and the KV cache is repeated (samples of one prompt
    share its prefill).
    """
    from transformers import DynamicCache

    inputs, mask = left_padded(prompts, pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = model.device
    inputs, mask, positions = inputs.to(device), mask.to(device), positions.to(device)
    cache = DynamicCache(config=model.config)
    extra = {_cache_argument(model): cache, **_last_logits_only(model)}

    def last_logits() -> torch.Tensor:
        step = {"input_ids": inputs, "attention_mask": mask, "position_ids": positions, **extra}
        return model(**step, use_cache=True).logits[:, -1, :]

    logits = last_logits()  # the prefill
    if copies > 1:
        logits = logits.repeat_interleave(copies, dim=0)
        cache.batch_repeat_interleave(copies)
        mask, positions = mask.repeat_interleave(copies, dim=0), positions.repeat_interleave(copies, dim=0)
    active = list(range(len(prompts) * copies))
    while True:
        picked = [(row, next_token(index, logits[row])) for row, index in enumerate(active)]
        keep = [row for row, token in picked if token is not None]
        if not keep:
            return
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            cache.batch_select_indices(rows)
            mask, positions = mask[rows], positions[rows]
            active = [active[row] for row in keep]
        inputs = torch.tensor([token for _, token in picked if token is not None], device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = last_logits()


def generate_batch(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    pad_token_id: int,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], bool | None] | None = None,
) -> list[list[int]]:
    """Completions of token-id prompts, decoded together (left padding, one KV cache).

    Args:
        model: A causal LM (or a peft model around one), in eval mode.
        prompts: Token ids of each prompt, without padding.
        params: Sampling; a sequence stops at the first of `params.stop_token_ids` (kept) or at max_new_tokens.
        pad_token_id: Fills the left of shorter prompts (hidden by the attention mask).
        num_return_sequences: Completions per prompt, returned next to each other: prompt 0's, then prompt 1's.
        generator: Draws the samples (seeded reproducibility); default: one seeded with `params.seed`, else
            torch's global generator.
        on_token: Called as on_token(sequence index, token) for each new token; returning True ends that sequence
            there (text-level stop strings, a cancelled request).

    Returns:
        The completion ids of each sequence, in order.
    """
    if num_return_sequences < 1:
        raise AiftError(f"num_return_sequences must be at least 1, got {num_return_sequences}")
    if generator is None and params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    completions: list[list[int]] = [[] for _ in range(len(prompts) * num_return_sequences)]
    stops = set(params.stop_token_ids)

    def next_token(index: int, logits: torch.Tensor) -> int | None:
        token = pick_token(logits, params, generator)
        completions[index].append(token)
        stopped = bool(on_token(index, token)) if on_token else False
        done = stopped or token in stops or len(completions[index]) >= params.max_new_tokens
        return None if done else token

    if prompts:
        decode(model, [list(p) for p in prompts], next_token, pad_token_id=pad_token_id, copies=num_return_sequences)
    return completions
