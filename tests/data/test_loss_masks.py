"""Loss masks from token offsets: the trained tokens decode to exactly the answers and end-of-turn markers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aift.data import DataError
from aift.data.formats import FORMATS, get_format
from aift.data.masking import encode
from aift.data.packing import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures"
CONVERSATIONS = json.loads((FIXTURES / "conversations.json").read_text(encoding="utf-8"))


def expected_trained(fmt, conversation, tokenizer) -> str:
    """Each answer as the format writes it, followed by its end-of-turn marker."""
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    pieces = []
    for i, answer in enumerate(answers):
        body = fmt.answer_text(answer) if hasattr(fmt, "answer_text") else answer
        pieces.append(body + fmt.end_of_turn(tokenizer, last=i == len(answers) - 1))
    return "".join(pieces)


def trained_runs(encoded) -> list[list[int]]:
    """The trained token ids, one list per stretch of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous = trained
    return runs


def trained_ids(encoded) -> list[int]:
    return [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]


@pytest.fixture(scope="module")
def llama_like_tokenizer(tokenizer):
    """The embedded tokenizer with <s> and </s> as special tokens, as in every Llama 2 tokenizer."""
    copied = copy.deepcopy(tokenizer)
    copied.add_tokens(["<s>", "</s>"], special_tokens=True)
    return copied


@pytest.mark.parametrize("name", list(FORMATS))
def test_trained_tokens_decode_to_exactly_the_answers(name, tokenizer, llama_like_tokenizer):
    fmt = get_format(name)
    tokenizer = llama_like_tokenizer if name == "llama2" else tokenizer
    for conversation in CONVERSATIONS:
        rendered = fmt.render(conversation, tokenizer)
        assert rendered.trained_text == expected_trained(fmt, conversation, tokenizer)
        encoded = encode(rendered, tokenizer, max_length=4096)
        assert encoded.truncated is None
        assert encoded.input_ids == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(trained_ids(encoded)) == rendered.trained_text or name == "rinna"
        runs = [tokenizer.decode(run) for run in trained_runs(encoded)]
        spans = [rendered.text[s:e] for s, e in rendered.spans]
        if name == "rinna":
            # The card's prompt ends with "システム: ": where the tokenizer joins that space to the answer's first
            # word (" 東"), the token is trained whole and decodes with the space; nothing else differs.
            runs = [run.removeprefix(" ") for run in runs]
        assert runs == spans
        # labels are the input ids where trained (not shifted: the model shifts)
        assert all(label in (IGNORE_INDEX, i) for i, label in zip(encoded.input_ids, encoded.labels, strict=True))


def test_train_on_prompt_trains_every_token(tokenizer):
    rendered = get_format("chatml").render(CONVERSATIONS[2], tokenizer)
    encoded = encode(rendered, tokenizer, max_length=4096, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids


def test_long_prompt_is_cut_from_the_left_and_the_answer_stays(tokenizer):
    conversation = [
        {"role": "user", "content": "word " * 400 + "最後の質問"},
        {"role": "assistant", "content": "答えです。"},
    ]
    rendered = get_format("template").render(conversation, tokenizer)
    encoded = encode(rendered, tokenizer, max_length=48)
    assert len(encoded.input_ids) == 48
    assert encoded.truncated == "prompt"
    assert tokenizer.decode(trained_ids(encoded)) == "答えです。<|im_end|>"
    assert encoded.text.endswith("最後の質問<|im_end|>\n<|im_start|>assistant\n答えです。<|im_end|>\n")
    assert rendered.text.endswith(encoded.text)


def test_answer_longer_than_the_limit_keeps_prompt_and_trained_tokens(tokenizer):
    conversation = [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": "lots " * 300}]
    rendered = get_format("chatml").render(conversation, tokenizer)
    encoded = encode(rendered, tokenizer, max_length=40)
    assert len(encoded.input_ids) == 40
    assert encoded.truncated == "answer"
    assert encoded.text.startswith("<|im_start|>user\nWrite a lot.")  # the short prompt is kept whole
    assert 0 < encoded.num_trained < 40


def test_truncation_in_multi_turn_keeps_the_last_answer(tokenizer):
    conversation = CONVERSATIONS[3]
    rendered = get_format("chatml").render(conversation, tokenizer)
    full = encode(rendered, tokenizer, max_length=4096)
    encoded = encode(rendered, tokenizer, max_length=len(full.input_ids) - 10)
    assert encoded.truncated == "prompt"
    assert tokenizer.decode(trained_ids(encoded)).endswith(conversation[-1]["content"] + "<|im_end|>")


def test_markers_that_are_plain_text_can_merge_at_the_seam(tokenizer):
    """llama2's "</s><s>" is two special tokens for Llama; as plain text a BPE token "><" spans the seam and,
    overlapping the trained span, is trained whole: the mask never loses a trained character."""
    rendered = get_format("llama2").render(CONVERSATIONS[2], tokenizer)
    decoded = tokenizer.decode(trained_ids(encode(rendered, tokenizer, max_length=4096)))
    assert decoded == rendered.trained_text.replace(" </s> ", " </s>< ", 1)


LLAMA3_LIKE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\\n\\n' + m['content'] + '<|endoftext|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\\n\\n' }}{% endif %}"
)


@pytest.fixture
def templated_tokenizer(tokenizer):
    """The embedded tokenizer with another chat template (Llama-3 shaped: header, blank line, end token)."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = LLAMA3_LIKE
    return copied


def test_template_spans_for_another_template(templated_tokenizer):
    fmt = get_format("template")
    assert fmt.end_of_turn(templated_tokenizer) == "<|endoftext|>"
    for conversation in CONVERSATIONS:
        rendered = fmt.render(conversation, templated_tokenizer)
        assert rendered.trained_text == expected_trained(fmt, conversation, templated_tokenizer)
        encoded = encode(rendered, templated_tokenizer, max_length=4096)
        assert templated_tokenizer.decode(trained_ids(encoded)) == rendered.trained_text


def test_template_that_rewrites_answers_is_refused(templated_tokenizer):
    from aift.data import DataError

    templated_tokenizer.chat_template = LLAMA3_LIKE.replace("m['content']", "m['content'] | upper")
    with pytest.raises(DataError, match="trained spans cannot be located"):
        get_format("template").render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], templated_tokenizer
        )


def test_bos_added_once_and_no_extra_eos(tokenizer):
    """A tokenizer that adds BOS and EOS (T5/Llama-style post-processor): BOS once, untrained; no second EOS."""
    both = copy.deepcopy(tokenizer)
    both.add_bos_token, both.add_eos_token = True, True
    both.update_post_processor()
    rendered = get_format("alpaca").render(CONVERSATIONS[0], both)
    encoded = encode(rendered, both, max_length=4096)
    assert encoded.input_ids[0] == both.bos_token_id and encoded.labels[0] == IGNORE_INDEX
    assert encoded.input_ids[1:] == tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    assert both.decode(trained_ids(encoded)) == rendered.trained_text
    chatml = get_format("chatml").render(CONVERSATIONS[0], both)  # starts with its BOS text <|im_start|>
    assert encode(chatml, both, max_length=4096).input_ids.count(both.bos_token_id) == 2  # two turns, no extra


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=40),
    spans=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 20)), max_size=5),
)
def test_vectorised_labels_equal_testing_every_span(tokens, spans):
    """trained_labels (binary search over merged spans) == the plain rule: a non-empty token span overlapping
    any trained span, for any offsets (empty, repeated, overlapping, out of order) and any spans."""
    from aift.data.masking import trained_labels

    offsets = [(start, start + width) for start, width in tokens]
    span_list = tuple((start, start + width) for start, width in spans)
    ids = list(range(100, 100 + len(offsets)))
    expected = [
        i if e > s and any(s < b and e > a for a, b in span_list) else IGNORE_INDEX
        for i, (s, e) in zip(ids, offsets, strict=True)
    ]
    assert trained_labels(ids, offsets, span_list) == expected


def test_the_rust_encoding_equals_the_transformers_call(tokenizer):
    """The prepare path reads ids and offsets straight from the backend tokenizer: the same as the wrapper's."""
    from aift.data.masking import _ids_and_offsets

    texts = [
        "日本の首都は東京です。",
        "Hello,  world!\n\n  x",
        "🙂 emoji and ｶﾀｶﾅ",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ]
    wrapped = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    expected = list(zip(wrapped["input_ids"], [list(map(tuple, o)) for o in wrapped["offset_mapping"]], strict=True))
    assert [(list(i), list(map(tuple, o))) for i, o in _ids_and_offsets(tokenizer, texts)] == expected


def test_rendering_many_equals_rendering_each_and_isolates_a_bad_row(tokenizer):
    fmt = get_format("template")
    good = [CONVERSATIONS[0], CONVERSATIONS[-1]]
    bad = [{"role": "assistant", "content": "an answer with no question"}]
    many = fmt.render_many([good[0], bad, good[1]], tokenizer)
    assert many[0] == fmt.render(good[0], tokenizer) and many[2] == fmt.render(good[1], tokenizer)
    assert isinstance(many[1], DataError)
    assert fmt.render_many(good, tokenizer) == [fmt.render(c, tokenizer) for c in good]
