"""Continuous batching's decoder: rows decoded together with one KV cache, where rows join (prefilled at a token
boundary) and leave between steps, so a batch never waits for its longest row.

batch = RunningBatch(model, pad_token_id=tok.pad_token_id)
logits = batch.add([prompt_ids, other_ids])  # last logits of each new row
logits = batch.step([token, other_token])    # one token per row, in row order: the next logits of each
batch.keep([1])                              # row 0 leaves; the old row 1 is row 0 now

Rows are right-aligned: each row's tokens end at the cache's last column. A row that joins is prefilled on its
own cache, then both caches are padded on the left to one width and stacked; a row that leaves takes its
columns with it, down to the longest row left. The attention mask hides the padding and the position ids count
only a row's own tokens, so a row computes what it would alone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from aift.inference.generation import _cache_argument, left_padded


def supports_running_batch(model) -> bool:
    """Whether the model's KV cache is plain full-attention layers, the only kind whose rows can be padded,
    stacked and cut here (sliding-window, linear-attention and shared-KV layers keep other state)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return all(type(layer) is DynamicLayer for layer in layers)


def _takes_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


class RunningBatch:
    """Rows of token ids decoded together, each at its own length (see the module's docstring)."""

    def __init__(self, model, pad_token_id: int):
        self.model, self.pad_token_id = model, pad_token_id
        self.device = model.device
        self._cache_kwarg = _cache_argument(model)
        # the prefill needs only the last position's logits: the head over the whole prompt is wasted work
        self._last_only = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
        self.cache = None  # a DynamicCache of [rows, heads, columns, head_dim] keys and values per layer
        self.mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a token
        self.next_position: torch.Tensor | None = None  # [rows]: the position id of each row's next token

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @torch.inference_mode()
    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefills new rows (after the running ones) and returns their last logits, [len(prompts), vocab].

        Prompts of similar lengths are prefilled together, others apart: padding a short prompt to a long one's
        length would cost more than the extra forward."""
        first = len(self)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        pieces = [self._prefill([prompts[i] for i in group]) for group in _similar_lengths(order, prompts)]
        placed = {i: first + slot for slot, i in enumerate(order)}  # where each prompt's row is now
        self.keep([*range(first), *(placed[i] for i in range(len(prompts)))])
        logits = torch.cat(pieces)
        return logits[[placed[i] - first for i in range(len(prompts))]]

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        from transformers import DynamicCache

        ids, mask = left_padded(prompts, self.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        if not len(self):
            self.cache, self.mask, self.next_position = cache, mask, mask.sum(-1)
            return logits
        width = max(self.mask.shape[1], mask.shape[1])
        stacked = [
            (
                torch.cat([_pad_left(k, width), _pad_left(k2, width)]),
                torch.cat([_pad_left(v, width), _pad_left(v2, width)]),
            )
            for (k, v, *_), (k2, v2, *_) in zip(self.cache, cache, strict=True)
        ]
        self.cache = DynamicCache(stacked)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.next_position = torch.cat([self.next_position, mask.sum(-1)])
        return logits

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feeds one token to each row and returns the next logits of each, [rows, vocab]."""
        if len(tokens) != len(self):
            raise ValueError(f"{len(tokens)} tokens for {len(self)} rows")
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        logits = self._forward(ids, self.mask, self.next_position.unsqueeze(1), self.cache)
        self.next_position = self.next_position + 1
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keeps only these rows, in this order; the columns that were padding in all of them go too."""
        if rows == list(range(len(self))):
            return
        if not rows:
            self.cache = self.mask = self.next_position = None
            return
        from transformers import DynamicCache

        index = torch.tensor(rows, device=self.device)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])
        self.cache = DynamicCache([(k[index, :, start:], v[index, :, start:]) for k, v, *_ in self.cache])
        self.mask, self.next_position = mask[:, start:], self.next_position[index]

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        step = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_kwarg: cache}
        return self.model(**step, use_cache=True, **self._last_only).logits[:, -1, :]


def _similar_lengths(order: list[int], prompts: list[list[int]], waste: float = 0.25) -> list[list[int]]:
    """`order` (prompt indices, shortest first) cut into groups each padded by at most `waste` of its tokens."""
    groups: list[list[int]] = []
    for i in order:
        group, length = (groups[-1] if groups else []), len(prompts[i])  # the longest of the group so far
        if group and (len(group) + 1) * length <= (1 + waste) * (sum(len(prompts[j]) for j in group) + length):
            group.append(i)
        else:
            groups.append([i])
    return groups


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros in front of the column axis (the last of a mask, the second to last of keys and values)."""
    missing = width - (tensor.shape[-1] if tensor.dim() == 2 else tensor.shape[-2])
    if missing == 0:
        return tensor
    return F.pad(tensor, (missing, 0)) if tensor.dim() == 2 else F.pad(tensor, (0, 0, missing, 0))
