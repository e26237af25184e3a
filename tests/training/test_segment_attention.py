"""aift_segment attention: packed rows attend within each example only, exactly as SDPA with a 4-D mask."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from aift.data.packing import PackedCollator
from aift.errors import AiftError
from aift.training import segment_attention
from aift.training.segment_attention import PackedAttention

LENGTHS = [[37, 100, 20], [150, 5]]  # two packed rows; the second is padded at the end
TOTAL = 160


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    segment_attention.register()
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def packed():
    """The same packed rows for both paths: 4-D mask (pads at position 0) and position_ids only."""
    generator = torch.Generator().manual_seed(0)
    rows = [
        [{"input_ids": torch.randint(0, 49152, (n,), generator=generator).tolist()} for n in row] for row in LENGTHS
    ]
    for row in rows:
        for ex in row:
            ex["labels"] = ex["input_ids"]
    with_mask = PackedCollator(0, TOTAL, mask="4d", pad_to_multiple_of=TOTAL)(rows)
    by_positions = PackedCollator(0, TOTAL, mask="position_ids", pad_to_multiple_of=TOTAL)(rows)
    real = torch.zeros(len(LENGTHS), TOTAL, dtype=torch.bool)
    for b, row in enumerate(LENGTHS):
        real[b, : sum(row)] = True
    return rows, with_mask, by_positions, real


def _run(model, implementation, batch, backward=False):
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    try:
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
        with torch.set_grad_enabled(backward):
            logits = model(**inputs).logits
            if backward:
                real = batch["labels"] != -100
                (logits[real].float().logsumexp(-1).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()} if backward else None
        return logits.detach(), grads
    finally:
        model.set_attn_implementation("sdpa")


def test_padding_positions_continue_the_last_example(packed):
    _, with_mask, by_positions, _ = packed
    assert "attention_mask" not in by_positions
    row = by_positions["position_ids"][1]
    assert row[150:155].tolist() == [0, 1, 2, 3, 4]
    assert row[155:].tolist() == list(range(5, 5 + TOTAL - 155))  # not a new example per pad token
    assert with_mask["position_ids"][1, 155:].eq(0).all()


@pytest.mark.parametrize("matmul_max_len", [512, 16, 0], ids=["matmul", "sdpa-for-long-segments", "sdpa-only"])
def test_logits_and_gradients_equal_sdpa_with_block_mask(model, packed, monkeypatch, matmul_max_len):
    monkeypatch.setattr(segment_attention, "MATMUL_MAX_LEN", {torch.float32: matmul_max_len})
    _, with_mask, by_positions, real = packed
    ref_logits, ref_grads = _run(model, "sdpa", with_mask, backward=True)
    logits, grads = _run(model, segment_attention.IMPLEMENTATION, by_positions, backward=True)
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-4, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_each_example_sees_only_itself(model, packed):
    rows, _, by_positions, _ = packed
    logits, _ = _run(model, segment_attention.IMPLEMENTATION, by_positions)
    start = 0
    for ex in rows[0]:
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0]
        n = ids.shape[1]
        torch.testing.assert_close(logits[0, start : start + n], alone, rtol=1e-4, atol=1e-4)
        start += n


def test_without_segments_the_rows_would_mix(model, packed):
    """The check above can fail: one segment per row (no position reset) gives other logits."""
    _, _, by_positions, real = packed
    merged = dict(by_positions, position_ids=torch.arange(TOTAL).expand(len(LENGTHS), -1))
    ref, _ = _run(model, segment_attention.IMPLEMENTATION, by_positions)
    mixed, _ = _run(model, segment_attention.IMPLEMENTATION, merged)
    assert (mixed[real] - ref[real]).abs().max() > 1e-2


def test_right_padding_is_accepted_left_padding_and_generation_are_refused(model):
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))
    right = torch.ones(2, 12, dtype=torch.long)
    right[1, 8:] = 0
    sdpa, _ = _run(model, "sdpa", {"input_ids": ids, "attention_mask": right})
    segment, _ = _run(model, segment_attention.IMPLEMENTATION, {"input_ids": ids, "attention_mask": right})
    torch.testing.assert_close(segment[right.bool()], sdpa[right.bool()], rtol=1e-4, atol=1e-4)
    with pytest.raises(AiftError, match="right-padded"):
        _run(model, segment_attention.IMPLEMENTATION, {"input_ids": ids, "attention_mask": right.flip(1)})
    model.set_attn_implementation(segment_attention.IMPLEMENTATION)
    try:
        with pytest.raises(AiftError, match="KV cache"):
            model.generate(ids[:1], max_new_tokens=2, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")


def test_loop_switches_for_packed_cpu_runs_only_and_restores(model, fp32_config):
    attention = PackedAttention(model, fp32_config(packing=True), "cpu")
    assert (attention.implementation, attention.mask) == (segment_attention.IMPLEMENTATION, "position_ids")
    with attention:
        assert model.config._attn_implementation == segment_attention.IMPLEMENTATION
    assert model.config._attn_implementation == "sdpa"
    assert PackedAttention(model, fp32_config(packing=False), "cpu").mask == "4d"
    assert PackedAttention(model, fp32_config(packing=True, segment_attention=False), "cpu").mask == "4d"
    assert PackedAttention(model, fp32_config(packing=True), "cuda").mask == "4d"


def test_trained_model_is_saved_with_its_own_attention(fp32_config, tmp_path, caplog):
    import logging

    from aift import FullFinetuningTrainer

    caplog.set_level(logging.INFO, logger="aift.training.loop")
    config = fp32_config(packing=True, max_steps=1, output_dir=str(tmp_path / "run"))
    model = FullFinetuningTrainer(config.model_name, config).train(train_texts=["一つ目の例です。", "二つ目。"] * 2)
    assert model.config._attn_implementation == "sdpa"
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert segment_attention.IMPLEMENTATION not in json.dumps(saved)
    assert f"attention {segment_attention.IMPLEMENTATION}" in caplog.text  # it trained with it
