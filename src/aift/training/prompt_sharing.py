"""One forward for a pair: the shared prompt once, then the chosen and the rejected answer beside each other.

A preference pair's two sequences start with the same prompt tokens. TRL (and a plain concatenated forward)
run the prompt twice, once per answer. Here a pair is one row ``prompt + chosen + rejected`` with a 4-D mask
in which the rejected answer sees the prompt but not the chosen answer, and position ids that restart the
rejected answer where the prompt ends. Every answer token then sees exactly the tokens it sees in its own
sequence, at the same positions, so the log-probs are those of the two separate sequences (tests compare them)
for ``P`` fewer tokens per pair, ``P`` the prompt length. The reference forward gains the same.

After the forward, the final hidden states are gathered back into the two virtual sequences (each answer's
own prompt + answer), so that the log-prob code downstream is the one of the unshared batch.
"""

from __future__ import annotations

import torch

from aift.data.packing import IGNORE_INDEX, answer_start


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
    layouts = [_layout(r) for r in rows]
    width = max(len(ids) for ids, _, _, _ in layouts)
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1)  # padding attends to itself: finite softmax
    virtual = []
    for b, (ids, positions, visible, (chosen_idx, rejected_idx)) in enumerate(layouts):
        length = len(ids)
        input_ids[b, :length] = torch.tensor(ids)
        position_ids[b, :length] = torch.tensor(positions)
        mask[b, :length, :length] = visible
        virtual.append((chosen_idx, rejected_idx, b * width))
    sequences = [[off + i for i in c] for c, _, off in virtual] + [[off + i for i in r] for _, r, off in virtual]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    vwidth = max(len(s) for s in sequences)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "gather_index": torch.tensor([s + [0] * (vwidth - len(s)) for s in sequences], dtype=torch.long),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (vwidth - len(lab)) for lab in labels], dtype=torch.long),
    }


def _layout(row: dict) -> tuple[list[int], list[int], torch.Tensor, tuple[list[int], list[int]]]:
    """(row ids, position ids, [L, L] visibility, indices of the chosen and rejected sequences in the row)."""
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    p = shared_prefix_length(chosen, rejected, row["chosen_labels"])
    c = len(chosen)
    ids = chosen + rejected[p:]
    positions = list(range(c)) + list(range(p, len(rejected)))
    visible = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    visible[c:, p:c] = False  # the rejected answer never sees the chosen one
    return ids, positions, visible, (list(range(c)), list(range(p)) + list(range(c, len(ids))))


def gather_sequences(hidden: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, L, H]`` of the shared rows -> ``[2B, Lv, H]`` of the two virtual sequences."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, gather_index.reshape(-1)).reshape(*gather_index.shape, hidden.shape[-1])
