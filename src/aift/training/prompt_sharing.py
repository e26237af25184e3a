"""One forward for answers that share a prompt: the prompt once, then every answer beside the others.

A preference pair's two sequences, and a GRPO group's ``G`` completions, start with the same prompt tokens.
TRL (and a plain batched forward) run the prompt once per answer. Here they are one row
``prompt + a_1 + ... + a_n`` with a 4-D mask in which each answer sees the prompt and itself (causally) but no
other answer, and position ids that restart each answer where the prompt ends. Every answer token then sees
exactly the tokens it sees in its own sequence, at the same positions, so the log-probs are those of the
separate sequences (tests compare them) for ``(n - 1) * P`` fewer tokens, ``P`` the prompt length. The
gradient reaching the shared prompt is the sum of what each answer's sequence sends it, as in the plain batch.

The mask comes from one segment id per position (:func:`segment_mask`: 0 the prompt, ``j`` answer ``j``, -1
padding). After the forward, the final hidden states are gathered back into the virtual sequences (each answer's
own prompt + answer, :func:`gather_sequences`), so that the log-prob code downstream is the one of the unshared
batch. DPO collates pairs with :func:`collate_shared`, GRPO groups with :func:`collate_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aift.data.packing import IGNORE_INDEX, answer_start

PADDING = -1  # the segment id of padding positions


@dataclass
class SharedRow:
    """A prompt and its answers in one row: token ids, position ids, segment ids, and each answer's sequence."""

    ids: list[int]
    positions: list[int]
    segments: list[int]
    sequences: list[list[int]]  # per answer: the row indices of its own sequence, prompt + answer


def shared_row(prompt: list[int], answers: list[list[int]]) -> SharedRow:
    """``prompt + answers[0] + answers[1] + ...``, each answer at the positions it has after the prompt."""
    p = len(prompt)
    ids, positions, segments, sequences = list(prompt), list(range(p)), [0] * p, []
    for j, answer in enumerate(answers, start=1):
        start = len(ids)
        ids += answer
        positions += range(p, p + len(answer))
        segments += [j] * len(answer)
        sequences.append(list(range(p)) + list(range(start, start + len(answer))))
    return SharedRow(ids, positions, segments, sequences)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` segment ids -> the ``[B, 1, L, L]`` bool mask (True: attend) of :func:`shared_row`'s rows.

    A position sees the earlier positions of the prompt (segment 0) and of its own segment; padding sees only
    itself (a finite softmax; its outputs are never read).
    """
    length = segments.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments.unsqueeze(-1), segments.unsqueeze(-2)
    visible = causal & ((key == 0) | (key == query)) & (query != PADDING)
    eye = torch.eye(length, dtype=torch.bool, device=segments.device)
    return (visible | (eye & (query == PADDING)))[:, None]


def _stack(rows: list[SharedRow], pad_token_id: int) -> dict:
    """The rows right-padded into ``input_ids``, ``position_ids`` and ``segment_ids`` ``[B, L]``."""
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.full((len(rows), width), PADDING, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.ids)
        input_ids[b, :n], position_ids[b, :n] = torch.tensor(row.ids), torch.tensor(row.positions)
        segment_ids[b, :n] = torch.tensor(row.segments)
    return {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids}


# ---------------------------------------------------------------------- preference pairs


def shared_prefix_length(chosen: list[int], rejected: list[int], chosen_labels: list[int]) -> int:
    """Tokens both sequences start with, at most up to the chosen answer's first trained token."""
    limit = min(answer_start(chosen_labels), len(chosen), len(rejected))
    n = 0
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return n


def collate_shared(rows: list[dict], pad_token_id: int) -> dict:
    """A micro-batch of pairs as one row each: input_ids, position_ids, a 4-D bool mask and the gather index.

    ``gather_index`` is ``[2B, Lv]`` into the flattened ``[B * L]`` positions (chosen sequences first, then the
    rejected ones, as the unshared collate orders rows), ``labels`` the matching ``[2B, Lv]`` labels.
    """
    shared = []
    for r in rows:
        chosen, rejected = r["chosen_input_ids"], r["rejected_input_ids"]
        p = shared_prefix_length(chosen, rejected, r["chosen_labels"])
        shared.append(shared_row(chosen[:p], [chosen[p:], rejected[p:]]))
    stacked = _stack(shared, pad_token_id)
    width = stacked["input_ids"].shape[1]
    sequences = [[b * width + i for i in row.sequences[k]] for k in (0, 1) for b, row in enumerate(shared)]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    vwidth = max(len(s) for s in sequences)
    return {
        "input_ids": stacked["input_ids"],
        "position_ids": stacked["position_ids"],
        "attention_mask": segment_mask(stacked["segment_ids"]),
        "gather_index": torch.tensor([s + [0] * (vwidth - len(s)) for s in sequences], dtype=torch.long),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (vwidth - len(lab)) for lab in labels], dtype=torch.long),
    }


# ---------------------------------------------------------------------- GRPO groups


def collate_groups(prompts: list[list[int]], groups: list[list[list[int]]], pad_token_id: int, width: int) -> dict:
    """Each prompt and its group of completions as one row; ``gather_index`` picks the logit positions.

    Keys: ``input_ids``, ``position_ids``, ``segment_ids`` ``[n, L]`` (no padding between completions: each
    keeps its own length) and ``gather_index`` ``[sum of group sizes, width]``: for completion ``c`` (groups in
    order) the flattened ``[n * L]`` positions whose logits predict its tokens, as the ``width`` last-but-one
    positions of its own right-padded sequence do (the prompt's last token predicts the first). Past a
    completion's end the index repeats its last position (those logits are masked out of every loss).
    """
    rows = [shared_row(p, g) for p, g in zip(prompts, groups, strict=True)]
    stacked = _stack(rows, pad_token_id)
    length = stacked["input_ids"].shape[1]
    index = []
    for b, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        for sequence in row.sequences:
            predicting = sequence[len(prompt) - 1 : -1] if len(sequence) > len(prompt) else sequence[-1:]
            predicting = predicting + predicting[-1:] * (width - len(predicting))
            index.append([b * length + i for i in predicting])
    stacked["gather_index"] = torch.tensor(index, dtype=torch.long)
    return stacked


def gather_sequences(hidden: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, L, H]`` of the shared rows -> ``[N, Lv, H]`` at ``gather_index`` ``[N, Lv]``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, gather_index.reshape(-1)).reshape(*gather_index.shape, hidden.shape[-1])
