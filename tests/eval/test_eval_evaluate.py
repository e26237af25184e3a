"""Loss over trained tokens (training's masking), greedy generation, base vs fine-tuned, argument resolution."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_fixtures import QA, write_prepared

from aift.eval.evaluate import (
    EvalError,
    compute_loss,
    evaluate,
    generate_answers,
    load_split,
)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_loss_is_token_weighted_mean_over_trained_tokens(tiny_model, prepared_dataset, tokenizer):
    rows = load_split(prepared_dataset, "test")
    total, count = 0.0, 0
    for row in rows:  # the model's own loss on each example alone (mean over its trained tokens)
        labels = torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total += tiny_model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
        count += n
    for batch_size in (1, 4):  # padding must not change the figure
        result = compute_loss(tiny_model, rows, tokenizer.pad_token_id, batch_size=batch_size)
        assert result["trained_tokens"] == count
        assert result["loss"] == pytest.approx(total / count, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_greedy_generation_batched_equals_one_by_one_and_argmax(embedded_model, tokenizer, prepared_dataset):
    rows = load_split(prepared_dataset, "test", max_samples=3)
    batched = generate_answers(embedded_model, tokenizer, rows, max_new_tokens=6, batch_size=3)
    single = generate_answers(embedded_model, tokenizer, rows, max_new_tokens=6, batch_size=1)
    assert batched == single
    # the first answer again with a plain argmax loop, without generate()
    ids = tokenizer(rows[0]["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            next_id = embedded_model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    prompt_len = len(tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"])
    expected = tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).strip().rstrip("\ufffd")
    assert batched[0] == expected
    assert any(batched), "the instruct model should answer something"


def test_compare_base_with_trained_adapter(tiny_model_dir, tiny_adapter, prepared_dataset, tiny_model, tokenizer):
    result = evaluate(str(tiny_model_dir), prepared_dataset, adapter=str(tiny_adapter), compare_base=True)
    base_alone = compute_loss(tiny_model, load_split(prepared_dataset, "test"), tokenizer.pad_token_id)
    # disable_adapter() must give exactly the base model
    assert result["base_metrics"]["loss"] == pytest.approx(base_alone["loss"], rel=1e-5)
    # the adapter was trained on these rows: it must be applied and must lower the loss a lot
    assert result["metrics"]["loss"] < result["base_metrics"]["loss"] - 1.0
    assert result["delta"]["loss"] == pytest.approx(result["metrics"]["loss"] - result["base_metrics"]["loss"])
    assert result["delta"]["perplexity"] < 0
    json.dumps(result)  # JSON-ready


def test_generation_scores_improve_after_fine_tune(tiny_adapter, prepared_dataset):
    # --model given as the adapter folder alone: its base comes from aift_meta.json
    result = evaluate(str(tiny_adapter), prepared_dataset, generate=True, compare_base=True, max_new_tokens=12)
    assert result["adapter"] == str(tiny_adapter)
    # the random base answers blank lines (chrF 0); the adapter, trained on these rows, moves answers toward them
    assert result["base_metrics"]["chrf"] < result["metrics"]["chrf"]
    assert result["delta"]["chrf"] == pytest.approx(result["metrics"]["chrf"] - result["base_metrics"]["chrf"])
    sample = result["samples"][0]
    assert set(sample) == {"prompt", "reference", "finetuned", "base"}
    assert sample["reference"] == QA[0][1]
    assert sample["finetuned"] != sample["base"]


def test_full_finetune_folder_compared_with_its_base(tmp_path, tiny_model_dir, prepared_dataset):
    # a "fine-tuned" folder that is the base itself: the difference must be exactly zero
    full = tmp_path / "full"
    full.mkdir()
    for item in tiny_model_dir.iterdir():
        (full / item.name).symlink_to(item)
    (full / "aift_meta.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "method": "full"}))
    result = evaluate(str(full), prepared_dataset, compare_base=True, max_samples=2)
    assert result["finetuned_model"] == str(full) and result["examples"] == 2
    assert result["delta"]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_are_clear_errors(tmp_path, tiny_model_dir, tokenizer, prepared_dataset):
    with pytest.raises(EvalError, match="not a prepared dataset"):
        load_split(tmp_path, "test")
    with pytest.raises(EvalError, match="no split 'validation'"):
        load_split(prepared_dataset, "validation")
    with pytest.raises(EvalError, match="--compare-base needs a fine-tune"):
        evaluate(str(tiny_model_dir), prepared_dataset, compare_base=True)
    from datasets import load_from_disk

    stripped = tmp_path / "no_prompt"
    load_from_disk(str(prepared_dataset)).remove_columns(["prompt", "reference"]).save_to_disk(str(stripped))
    assert len(load_split(stripped, "test")) == len(QA)  # loss alone needs no prompt
    with pytest.raises(EvalError, match="lacks column.*prompt, reference.*--generate"):
        load_split(stripped, "test", generate=True)
    masked = write_prepared(tmp_path / "masked", tokenizer, QA[:1], QA[:1])
    ds = load_from_disk(str(masked))
    ds = ds.map(lambda row: {"labels": [-100] * len(row["labels"])})
    ds.save_to_disk(str(tmp_path / "all_masked"))
    with pytest.raises(EvalError, match="no trained tokens"):
        evaluate(str(tiny_model_dir), tmp_path / "all_masked")


def test_warns_when_data_format_differs_from_training(tmp_path, prepared_dataset, caplog):
    from aift.eval.evaluate import warn_on_mismatch
    from aift.models.run_folder import RunTarget

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "aift_meta.json").write_text(
        json.dumps({"base_model": "b", "method": "qlora", "prompt_format": "alpaca"})
    )
    with caplog.at_level("WARNING"):
        warn_on_mismatch(RunTarget(base="b", adapter=str(adapter)), prepared_dataset, load_in_4bit=False)
    assert "prompt format 'alpaca'" in caplog.text and "'chatml'" in caplog.text
    assert "--load-in-4bit" in caplog.text
    caplog.clear()
    (adapter / "aift_meta.json").write_text(
        json.dumps({"base_model": "b", "method": "lora", "prompt_format": "chatml"})
    )
    warn_on_mismatch(RunTarget(base="b", adapter=str(adapter)), prepared_dataset, load_in_4bit=False)
    assert caplog.text == ""
