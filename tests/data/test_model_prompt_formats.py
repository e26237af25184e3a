"""JapaneseModel prompts and answers in the model's own format: stored with a fine-tune, or set by name."""

from __future__ import annotations

import json
import shutil

import pytest

from aift import JapaneseModel


@pytest.fixture(scope="module")
def rinna_finetune_dir(tiny_model_dir, tmp_path_factory):
    """A fine-tuned folder whose aift_meta.json says it was trained in the rinna format."""
    folder = tmp_path_factory.mktemp("ft") / "final"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "aift_meta.json").write_text(json.dumps({"prompt_format": "rinna", "base_model": "tiny"}))
    return folder


def test_stored_format_is_used_without_naming_it(rinna_finetune_dir):
    model = JapaneseModel(str(rinna_finetune_dir), device="cpu")
    assert model.build_prompt("日本の首都は？\n一言で。") == "ユーザー: 日本の首都は？<NL>一言で。<NL>システム: "
    answer = model.generate_japanese("こんにちは", max_new_tokens=8, do_sample=False)
    assert isinstance(answer, str) and "<NL>" not in answer and "<|im_end|>" not in answer


def test_explicit_format_overrides_with_a_warning(rinna_finetune_dir, caplog):
    model = JapaneseModel(str(rinna_finetune_dir), device="cpu")
    model.prompt_format = "user-assistant"
    assert model.build_prompt("質問", "入力") == "<|user|>質問\n\n入力<|endoftext|>\n<|assistant|>"
    assert "'rinna'" in caplog.text and "'user-assistant'" in caplog.text


def test_embedded_model_uses_its_chat_template(tokenizer):
    model = JapaneseModel()
    model.tokenizer = tokenizer
    assert model.build_prompt("質問").endswith("<|im_start|>user\n質問<|im_end|>\n<|im_start|>assistant\n")
