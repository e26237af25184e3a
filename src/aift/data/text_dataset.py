"""`TextDataset`: the Python API's dataset over raw strings, with optional loss masking before a response marker."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aift.data.packing import IGNORE_INDEX
from aift.errors import AiftError


class TextDataset(torch.utils.data.Dataset):
    """Tokenized raw strings for causal-LM training.

    Each text is tokenized (truncated to ``max_length`` tokens) with the tokenizer's EOS appended when the
    text does not already end with it, so that the model learns where an answer stops. By default every
    token is trained; with ``response_template`` (for example ``"回答:"`` or ``"<|assistant|>"``) everything
    up to and including the first occurrence of the marker is masked (label -100). The marker is found in
    the text and mapped to tokens through the tokenizer's character offsets, so it works whatever tokens
    the marker merges into.

    Args:
        texts: The training strings.
        tokenizer: A fast Hugging Face tokenizer (offsets are needed with ``response_template``).
        max_length: Truncation length in tokens.
        response_template: Marker before the part to train on; None trains on all tokens.
    """

    def __init__(self, texts: Sequence[str], tokenizer, max_length: int = 512, response_template: str | None = None):
        if isinstance(texts, str):
            raise AiftError("TextDataset expects a list of strings, got a single string")
        if max_length <= 0:
            raise AiftError(f"max_length must be positive, got {max_length}")
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.response_template = response_template
        for i, text in enumerate(self.texts):
            if not isinstance(text, str):
                raise AiftError(f"TextDataset: text {i} is a {type(text).__name__}, expected str")
        self._examples = [self._encode(text) for text in self.texts]

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, labels = self._examples[index]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        eos = self.tokenizer.eos_token
        if eos and not text.endswith(eos):
            text = text + eos
        enc = self.tokenizer(
            text,
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=self.response_template is not None,
        )
        input_ids = list(enc["input_ids"])
        if self.response_template is None:
            return input_ids, list(input_ids)
        marker_at = text.find(self.response_template)
        if marker_at < 0:
            return input_ids, [IGNORE_INDEX] * len(input_ids)
        answer_starts = marker_at + len(self.response_template)
        # A token is part of the answer when it starts at or after the end of the marker.
        labels = [
            tok if start >= answer_starts else IGNORE_INDEX
            for tok, (start, _end) in zip(input_ids, enc["offset_mapping"], strict=True)
        ]
        return input_ids, labels
