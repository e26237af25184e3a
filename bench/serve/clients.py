"""The load on `aift serve`: clients of the official openai client, each asking one request after another.

`load` runs a fixed time with prompts and max_tokens of mixed lengths and times every streamed answer; `soak` sends
a fixed number of requests, some of which hang up mid-stream or are malformed, and checks every answer.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
import openai

# Mixed prompt lengths: a few tokens, a sentence, a paragraph to summarise (~250 tokens in the chat template).
_PARAGRAPH = (
    "The lighthouse stood on a rock at the mouth of the bay. Every evening the keeper climbed its ninety steps, "
    "trimmed the wick, polished the lens and watched the ships come in from the grey sea. In winter the storms "
    "threw spray over the lamp room, and in summer children from the village came to count the gulls. "
)
PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Name three colours of the rainbow and say which one you like best.",
    "Explain in detail how a bicycle works, part by part.",
    "Write a long story about a lighthouse keeper.",
    f"Summarise this text in two sentences:\n\n{_PARAGRAPH * 3}",
    f"Read this and list every object it mentions:\n\n{_PARAGRAPH * 2}",
]
MAX_TOKENS = [8, 16, 32, 64, 128]


@dataclass
class Timing:
    """One streamed answer: seconds from sending to the first token, to the end, and its token count."""

    ttft: float
    total: float
    tokens: int
    finish: str
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive content chunks

    @property
    def per_token(self) -> float | None:
        """Seconds per token after the first (TPOT), None for a one-token answer."""
        return (self.total - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


def _request(rng: random.Random) -> dict:
    prompt = rng.choice(PROMPTS)
    return {
        "model": "smol",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": rng.choice(MAX_TOKENS),
        "temperature": 0.8,
        "seed": rng.randrange(1 << 30),
    }


async def _stream(client: openai.AsyncOpenAI, body: dict, hang_up: bool = False) -> Timing:
    """Asks for a streamed answer and times it; with hang_up, closes the stream after the first token."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    ttft, last, gaps, tokens, finish = None, None, [], 0, ""
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        if choice.delta.content:
            if ttft is None:
                ttft = now - start
                if hang_up:
                    await stream.close()
                    return Timing(ttft, now - start, 1, "hung up")
            else:
                gaps.append(now - last)
            last = now
    total = time.perf_counter() - start
    return Timing(ttft if ttft is not None else total, total, tokens, finish, gaps)


async def load(url: str, clients: int, seconds: float, seed: int = 0) -> dict:
    """`clients` clients ask streamed requests until `seconds` have passed; the wall time runs to the last answer."""
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    timings: list[Timing] = []
    deadline = time.perf_counter() + seconds

    async def one_client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.perf_counter() < deadline:
            timings.append(await _stream(client, _request(rng)))

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one_client(i) for i in range(clients)))
    finally:
        await client.close()
    return summarise(timings, time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(timings: list[Timing], wall: float) -> dict:
    tokens = sum(t.tokens for t in timings)
    ttft = [t.ttft for t in timings]
    tpot = [t.per_token for t in timings if t.per_token is not None]
    gaps = [g for t in timings for g in t.gaps]
    return {
        "requests": len(timings),
        "wall_s": wall,
        "requests_per_s": len(timings) / wall,
        "generated_tokens": tokens,
        "generated_tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "per_token_p50_s": percentile(tpot, 50),
        "per_token_p95_s": percentile(tpot, 95),
        "inter_chunk_p50_s": percentile(gaps, 50),
        "inter_chunk_p95_s": percentile(gaps, 95),
        "finish_reasons": {r: sum(t.finish == r for t in timings) for r in sorted({t.finish for t in timings})},
    }


# Malformed requests, each with the status it must get: raw bodies the server has to refuse before generating.
MALFORMED: list[tuple[str, bytes | dict, int]] = [
    ("broken JSON", b'{"model": "smol", "messages": [', 400),
    ("no messages", {"model": "smol"}, 400),
    ("negative max_tokens", {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400),
    ("unknown role", {"model": "smol", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("temperature 5", {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("n=2", {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
]


@dataclass
class SoakResult:
    kind: str  # "answer", "stream", "hang-up", "malformed"
    ok: bool
    detail: str = ""


async def _soak_one(client: openai.AsyncOpenAI, http: httpx.AsyncClient, rng: random.Random) -> SoakResult:
    roll = rng.random()
    if roll < 0.05:
        name, body, status = rng.choice(MALFORMED)
        kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
        response = await http.post("/chat/completions", **(kwargs if isinstance(body, bytes) else {"json": body}))
        ok = response.status_code == status and "error" in response.json() and "Traceback" not in response.text
        return SoakResult("malformed", ok, f"{name}: {response.status_code}")
    body = _request(rng)
    if roll < 0.15:
        timing = await _stream(client, body, hang_up=True)  # an answer may end before its first token is read
        return SoakResult("hang-up", timing.finish in ("hung up", "stop", "length"), timing.finish)
    if roll < 0.6:
        timing = await _stream(client, body)
        full = timing.finish in ("stop", "length") and 0 < timing.tokens <= body["max_tokens"]
        full = full and (timing.finish != "length" or timing.tokens == body["max_tokens"])
        return SoakResult("stream", full, f"{timing.finish} {timing.tokens}/{body['max_tokens']}")
    reply = await client.chat.completions.create(**body)
    usage, finish = reply.usage, reply.choices[0].finish_reason
    full = finish in ("stop", "length") and (finish != "length" or usage.completion_tokens == body["max_tokens"])
    return SoakResult("answer", full, f"{finish} {usage.completion_tokens}/{body['max_tokens']}")


async def soak(url: str, clients: int, requests: int, seed: int = 1) -> dict:
    """`requests` requests over `clients` clients: ~10 % hang up after the first token, ~5 % are malformed,
    the rest are answered streamed or whole. Every answer is checked."""
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    http = httpx.AsyncClient(base_url=url, timeout=600)
    rng = random.Random(seed)
    results: list[SoakResult] = []
    left = requests

    async def one_client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                results.append(await _soak_one(client, http, random.Random(rng.random())))
            except (openai.APIError, httpx.HTTPError) as e:
                results.append(SoakResult("error", False, f"{type(e).__name__}: {e}"))

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one_client() for _ in range(clients)))
    finally:
        await client.close()
        await http.aclose()
    kinds = sorted({r.kind for r in results})
    return {
        "requests": len(results),
        "wall_s": time.perf_counter() - start,
        "by_kind": {
            k: {"sent": sum(r.kind == k for r in results), "ok": sum(r.ok for r in results if r.kind == k)}
            for k in kinds
        },
        "all_ok": all(r.ok for r in results),
        "failures": [asdict(r) for r in results if not r.ok][:20],
    }
