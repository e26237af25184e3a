"""`python -m aift serve` on the embedded model with two LoRA adapters, driven by the official openai client:
plain and streamed chat, text completions, each adapter in its own prompt format, OpenAI-style errors, the API
key, 50 concurrent requests, and nothing secret in the log. One server process for the whole module."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import openai
import pytest
from post_helpers import make_lora_adapter
from serve_helpers import serve_subprocess

from aift.data.formats import get_format
from aift.serve.engine import Engine, Sampling
from aift.serve.models import load_served_models

KEY = f"sk-aift-test-{secrets.token_hex(8)}"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ADAPTER_FORMATS = {"alpaca-lora": "alpaca", "chatml-lora": "chatml"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("serve-adapters")
    return {
        name: make_lora_adapter(embedded_dir, root / name, prompt_format=fmt, seed=seed)
        for seed, (name, fmt) in enumerate(ADAPTER_FORMATS.items(), start=1)
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_dir, adapters):
    args = ["--model", embedded_dir, "--served-model-name", "smol", "--max-pending", "64", "--device", "cpu"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with serve_subprocess(args, {"AIFT_API_KEY": KEY}, log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def _prompt_tokens(tokenizer, format_name: str, messages: list[dict]) -> int:
    prompt = get_format(format_name).generation_prompt(messages, tokenizer)
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_models_lists_the_base_and_each_adapter(client):
    assert {m.id for m in client.models.list()} == {"smol", *ADAPTER_FORMATS}
    assert client.models.retrieve("alpaca-lora").id == "alpaca-lora"


def test_chat_plain_and_streamed_agree_with_usage(client, tokenizer):
    plain = client.chat.completions.create(model="smol", messages=FRANCE, temperature=0, max_tokens=12)
    answer = plain.choices[0].message.content
    assert "Paris" in answer and plain.choices[0].finish_reason == "stop"
    assert plain.usage.prompt_tokens == _prompt_tokens(tokenizer, "template", FRANCE)
    assert 0 < plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="smol",
            messages=FRANCE,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed piece by piece
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_each_adapter_answers_in_its_own_format(client, adapters, tokenizer):
    answers = {}
    for name, fmt in ADAPTER_FORMATS.items():
        reply = client.chat.completions.create(model=name, messages=FRANCE, temperature=0, max_tokens=8)
        assert reply.model == name
        assert reply.usage.prompt_tokens == _prompt_tokens(tokenizer, fmt, FRANCE)  # its aift_meta.json format
        answers[name] = reply.choices[0].message.content
    # the adapter loaded second (so set_adapter must switch to it) answers as it does merged and served alone
    alone = Engine(load_served_models(str(adapters["chatml-lora"]), name="alone", device="cpu")).start()
    try:
        expected = alone.submit_chat("alone", FRANCE, Sampling(max_tokens=8, temperature=0)).result().answer
    finally:
        alone.close()
    assert answers["chatml-lora"] == expected
    base = client.chat.completions.create(model="smol", messages=FRANCE, temperature=0, max_tokens=8)
    assert len({*answers.values(), base.choices[0].message.content}) == 3


def test_text_completions_plain_and_streamed(client):
    done = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert done.choices[0].text == " 5, 6," and done.choices[0].finish_reason == "stop"
    capped = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=3, temperature=0)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 3
    stream = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=3, temperature=0, stream=True)
    pieces = list(stream)
    assert "".join(p.choices[0].text for p in pieces) == capped.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text
    return error


def test_bad_requests_get_openai_errors(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    missing = _error(httpx.post(url, json={"model": "smol"}, headers=auth, timeout=30), 400)
    assert missing["param"] == "messages" and missing["type"] == "invalid_request_error"
    broken = httpx.post(url, content=b"{not json", headers={**auth, "Content-Type": "application/json"}, timeout=30)
    _error(broken, 400)

    with pytest.raises(openai.BadRequestError, match="unknown role 'wizard'"):
        client.chat.completions.create(model="smol", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4", messages=FRANCE)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as negative:
        client.chat.completions.create(model="smol", messages=FRANCE, max_tokens=-1)
    assert negative.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "word " * 9000}])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model="smol", messages=[{"role": "assistant", "content": "hi"}])


def test_api_key_is_required(server):
    url = f"{server.url}/v1/models"
    assert _error(httpx.get(url, timeout=30), 401)["code"] == "invalid_api_key"
    _error(httpx.get(url, headers={"Authorization": f"Bearer {KEY}x"}, timeout=30), 401)
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong-key-9431", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


async def _ask_concurrently(url: str, questions: list[str]) -> list[str]:
    """Every question at once; even ones streamed, odd ones plain."""
    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300)

    async def ask(i: int, question: str) -> str:
        messages = [{"role": "user", "content": question}]
        if i % 2:
            reply = await client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=8)
            return reply.choices[0].message.content
        stream = await client.chat.completions.create(
            model="smol", messages=messages, temperature=0, max_tokens=8, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        return await asyncio.wait_for(asyncio.gather(*(ask(i, q) for i, q in enumerate(questions))), timeout=600)
    finally:
        await client.close()


def test_fifty_concurrent_requests_lose_and_mix_none(server, client):
    distinct = [f"What is {a} plus {b}?" for a, b in ((2, 3), (10, 20), (7, 8), (100, 1), (6, 6))]
    expected = {
        q: client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=8
        )
        .choices[0]
        .message.content
        for q in distinct
    }
    assert len(set(expected.values())) == len(distinct)  # so an answer given to the wrong request would show
    questions = distinct * 10
    answers = asyncio.run(_ask_concurrently(f"{server.url}/v1", questions))
    assert answers == [expected[q] for q in questions]
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["pending"] == 0 and health["stats"]["largest_batch"] > 1  # they were batched


def test_keys_and_prompts_are_not_logged(server, client):
    secret = "my private question about zebras 77310"
    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": secret}], max_tokens=2)
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-wrong-key-9431"}, timeout=30)
    log = server.log_text()
    assert "POST /v1/chat/completions" in log  # the log is live
    assert KEY not in log and "sk-wrong-key-9431" not in log and "zebras" not in log
