import torch

from aift.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    PaddedCollator,
    best_fit_decreasing,
    block_causal_mask,
    length_grouped_batches,
    packing_efficiency,
)


def test_best_fit_decreasing_fills_bins_and_keeps_every_example():
    lengths = [500, 12, 300, 200, 7, 490, 20, 100, 260, 250]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # The lower bound is ceil(2139 / 512) = 5 bins; best-fit decreasing reaches it here.
    assert len(bins) == 5
    assert packing_efficiency(lengths, bins, 512) > 0.83


def test_best_fit_rejects_too_long_example():
    import pytest

    with pytest.raises(ValueError, match="example 1 has 600 tokens"):
        best_fit_decreasing([10, 600], 512)


def test_block_causal_mask_is_block_diagonal():
    mask = block_causal_mask([[2, 3]], 6)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],  # padding attends only to itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_packed_collator_positions_labels_and_counts():
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    batch = PackedCollator(pad_token_id=0, max_length=16)([[a, b]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    # b's first token is never predicted from a's last token
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert batch["num_tokens"].item() == 5
    assert batch["num_trained_tokens"].item() == 3
    assert batch["attention_mask"].shape == (1, 1, 8, 8)


def test_padded_collator_pads_to_longest_not_max_length():
    batch = PaddedCollator(pad_token_id=0)(
        [{"input_ids": [1] * 9, "labels": [1] * 9}, {"input_ids": [2], "labels": [2]}]
    )
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 10


def test_length_grouped_batches_cover_all_and_group_lengths():
    lengths = [i % 97 for i in range(400)]
    batches = length_grouped_batches(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 8 would spread ~70


def test_packed_loss_equals_one_by_one_on_embedded_model(embedded_model, tokenizer):
    """The invariance that makes packing safe: per-token loss packed == stand-alone, within 1e-4 (fp32)."""
    texts = ["The capital of France is Paris.", "東京は日本の首都です。", "1 + 1 = 2, and 2 + 2 = 4."]
    examples = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": ids, "labels": ids})
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id, max_length=64)([examples])
    with torch.no_grad():
        logits = embedded_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[0]
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            alone = embedded_model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            packed_loss = torch.nn.functional.cross_entropy(
                logits[start : start + n - 1], torch.tensor(ex["input_ids"][1:]), reduction="none"
            )
            alone_loss = torch.nn.functional.cross_entropy(
                alone[:-1], torch.tensor(ex["input_ids"][1:]), reduction="none"
            )
            assert torch.allclose(packed_loss, alone_loss, atol=1e-4), (packed_loss - alone_loss).abs().max()
            start += n
