"""Rendered text -> token ids and labels, with the loss mask taken from token offsets.

A token is trained when its character span (``return_offsets_mapping``) overlaps a trained span of the
rendered text. The whole text is tokenized once, so the mask is exact for any tokenizer: no piece is
tokenized on its own, where merges at the seams would differ.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from aift.data import DataError
from aift.data.conversation import Rendered
from aift.data.packing import IGNORE_INDEX, count_trained_tokens


@dataclass
class Encoded:
    """One tokenized example. ``truncated`` is None, "prompt" or "answer"."""

    input_ids: list[int]
    labels: list[int]
    text: str
    truncated: str | None = None

    @property
    def num_trained(self) -> int:
        return count_trained_tokens(self.labels)


def trained_labels(ids: list[int], offsets: list, spans: tuple[tuple[int, int], ...]) -> list[int]:
    """Each token's id where its character span overlaps a trained span (and is not empty), else IGNORE_INDEX.

    Vectorised: with the spans merged into sorted, disjoint ones, the only span a token can overlap first is
    the first one ending after the token starts (a binary search); it overlaps when it starts before the
    token ends. The same as testing every span, at a fraction of the Python work per token.
    """
    if not ids:
        return []
    merged = _merge(spans)
    if not merged:
        return [IGNORE_INDEX] * len(ids)
    # fromiter over the flattened pairs: half the time of asarray on a list of tuples
    offsets = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    span_starts, span_ends = np.asarray(merged, dtype=np.int64).T
    first = np.searchsorted(span_ends, starts, side="right")  # the first span ending after the token starts
    candidate = np.minimum(first, len(merged) - 1)
    hit = (ends > starts) & (first < len(merged)) & (span_starts[candidate] < ends)
    return np.where(hit, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def _merge(spans: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """Spans sorted by start, overlapping or touching ones joined (an empty span still marks a token around it)."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text it encodes with special tokens."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def encode(rendered: Rendered, tokenizer, max_length: int, train_on_prompt: bool = False) -> Encoded:
    """Tokenizes a rendered conversation, masks what is not trained and fits it into ``max_length`` tokens.

    Over the limit, the prompt side is cut first (from the left, so the question nearest the answer and the
    answer opening stay); only an answer longer than the limit by itself is cut at its end.
    """
    return encode_batch([rendered], tokenizer, max_length, train_on_prompt)[0]


def encode_batch(rendered: list[Rendered], tokenizer, max_length: int, train_on_prompt: bool = False) -> list[Encoded]:
    """`encode` for many conversations with one batched tokenizer call (the same ids and labels)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("loss masks need a fast tokenizer (offsets); this model's tokenizer has no fast version")
    texts = [r.text for r in rendered]
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else None
    return [
        _mask_and_fit(r, list(ids), list(offsets), bos, tokenizer.bos_token_id, max_length, train_on_prompt)
        for r, (ids, offsets) in zip(rendered, _ids_and_offsets(tokenizer, texts), strict=True)
    ]


def _ids_and_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, no special tokens added, nothing truncated or padded.

    Straight from the Rust tokenizer (``backend_tokenizer``, the same encoding transformers would call) when it
    is set to neither truncate nor pad: transformers' wrapper would spend about as long again converting its
    output. Otherwise through the wrapper, which sets those up per call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    return list(zip(encoding["input_ids"], encoding["offset_mapping"], strict=True))


def _mask_and_fit(
    rendered: Rendered, ids: list[int], offsets: list, bos: str | None, bos_id, max_length: int, train_on_prompt: bool
) -> Encoded:
    text = rendered.text
    # Only BOS is added by hand: add_special_tokens=True would also append EOS for some tokenizers (T5-style),
    # doubling the end marker the format already wrote.
    if bos is not None and not text.startswith(bos):
        ids, offsets = [bos_id, *ids], [(0, 0), *offsets]
    spans = ((0, len(text)),) if train_on_prompt else rendered.spans
    labels = trained_labels(ids, offsets, spans)
    if len(ids) <= max_length:
        return Encoded(ids, labels, text)
    start, stop, kind = _window(labels, max_length)
    kept = [o for o in offsets[start:stop] if o[1] > o[0]]
    return Encoded(ids[start:stop], labels[start:stop], text[kept[0][0] : kept[-1][1]], kind)


def _window(labels: list[int], max_length: int) -> tuple[int, int, str]:
    """The token range to keep for an over-long example, and what was cut."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return len(labels) - max_length, len(labels), "prompt"
    last_run = trained[-1]  # walks back to the start of the last trained run (the last answer)
    while last_run > 0 and labels[last_run - 1] != IGNORE_INDEX:
        last_run -= 1
    if len(labels) - last_run <= max_length:
        return len(labels) - max_length, len(labels), "prompt"
    # The last answer alone is too long: keep up to half the window of the prompt before it, then its start.
    start = last_run - min(last_run, max_length // 2)
    return start, start + max_length, "answer"
