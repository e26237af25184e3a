"""The embedded model's tokenizer, built straight from the GGUF, is the one the converted folder holds."""

from __future__ import annotations

from aift.models.embedded import gguf_path, gguf_tokenizer

TEXTS = [
    "日本で一番高い山は何ですか。",
    "Hello, world! 富士山 is 3,776 m tall.",
    "  leading spaces\n\ttabs, 改行\nand <|im_end|> inside",
]
CHAT = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "寿司の「シャリ」とは? Answer in English too."},
    {"role": "assistant", "content": "酢飯のことです (vinegared rice)."},
]


def test_the_gguf_tokenizer_gives_the_converted_folders_ids_and_chat_template(tokenizer):
    built = gguf_tokenizer(gguf_path())
    for text in TEXTS:
        assert built(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert built.chat_template == tokenizer.chat_template
    for messages in (CHAT, CHAT[1:2]):  # the second gets the template's default system prompt
        rendered = built.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert (
            built(rendered, add_special_tokens=False)["input_ids"]
            == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        )
    assert (built.eos_token, built.pad_token, built.bos_token) == (
        tokenizer.eos_token,
        tokenizer.pad_token,
        tokenizer.bos_token,
    )
    assert built.get_vocab() == tokenizer.get_vocab()
