import pytest
import torch

from aift.data.text_dataset import TextDataset
from aift.errors import AiftError


def test_trains_on_every_token_and_ends_with_eos(tokenizer):
    ds = TextDataset(["こんにちは、世界。"], tokenizer)
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["input_ids"][-1].item() == tokenizer.eos_token_id
    assert torch.equal(item["labels"], item["input_ids"])
    assert torch.equal(item["attention_mask"], torch.ones_like(item["input_ids"]))


def test_response_template_masks_everything_up_to_the_marker(tokenizer):
    text = "質問: 日本の首都はどこですか?\n回答: 東京です。"
    item = TextDataset([text], tokenizer, response_template="回答:")[0]
    trained = item["input_ids"][item["labels"] != -100]
    assert tokenizer.decode(trained).strip() == "東京です。" + tokenizer.eos_token
    masked = item["input_ids"][item["labels"] == -100]
    assert tokenizer.decode(masked).startswith("質問: 日本の首都")


def test_missing_marker_trains_nothing_and_truncation_holds(tokenizer):
    ds = TextDataset(["no marker here", "あ" * 200], tokenizer, max_length=16, response_template="回答:")
    assert (ds[0]["labels"] == -100).all()
    assert len(ds[1]["input_ids"]) == 16


def test_bad_input_is_a_clear_error(tokenizer):
    with pytest.raises(AiftError, match="list of strings"):
        TextDataset("just one string", tokenizer)
    with pytest.raises(AiftError, match="text 1"):
        TextDataset(["ok", 3], tokenizer)
