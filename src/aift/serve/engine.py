"""Generation for many concurrent requests: one worker thread owns the model, takes queued requests for the same
model in batches, decodes them together with one KV cache, and streams each request's text back on its own.

engine = Engine(load_served_models("smollm2-135m-instruct", adapters={"ja": "runs/ja/final"}))
engine.start()
handle = engine.submit_chat("ja", [{"role": "user", "content": "日本の首都は?"}], Sampling(max_tokens=64))
for event in handle:
    print(event.text, end="")

No web framework here: aift.serve.app puts an OpenAI-compatible HTTP API in front of it, and anything else in the
process (a UI) can submit to the same engine or hold `engine.model_lock` to use the model directly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from aift.data import DataError
from aift.errors import AiftError
from aift.inference.batching import RunningBatch, supports_running_batch
from aift.inference.generation import SamplingParams, decode, eos_token_ids, pick_token
from aift.inference.runner import _EXTRA_MARKERS, _held_back, build_prompt
from aift.serve.models import ServedModel, adapter_active

log = logging.getLogger(__name__)


class UnknownModelError(AiftError):
    """The request names a model the engine does not serve."""


class QueueFullError(AiftError):
    """As many requests as the engine admits are already waiting or generating."""


class ContextLengthError(DataError):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""


@dataclass
class Sampling:
    """How one request is decoded. temperature 0 is greedy; otherwise nucleus sampling from its own generator,
    seeded by `seed` when given, so a seeded request draws the same numbers whatever it is batched with."""

    max_tokens: int | None = None  # None: up to the engine's default_max_tokens, within the context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise DataError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DataError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Event:
    """A piece of a request's output. The last event has finish_reason set ("stop", "length", "cancelled" or
    "error") and `answer`, the whole text (cut at stop strings)."""

    text: str = ""
    finish_reason: str | None = None
    answer: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None


class Handle:
    """A submitted request: iterate it (or `await next_event()` when submitted with a loop) for its events."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.prompt_tokens = 0

    def cancel(self) -> None:
        """Stops the generation at the next token (no-op once it has finished)."""
        self.cancelled.set()

    def _emit(self, event: Event) -> None:
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    async def next_event(self) -> Event:
        return await self._events.get()

    def __iter__(self) -> Iterator[Event]:
        if self._loop is not None:
            raise RuntimeError("this request was submitted with an event loop; use `await next_event()`")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason:
                return

    def result(self) -> Event:
        """Waits for the end and returns the final event (answer, finish_reason, token counts)."""
        for event in self:
            if event.finish_reason:
                return event
        raise AssertionError("unreachable")


class _TextOutput:
    """The visible text of one request as tokens arrive: cut at the first stop string, with any tail that could
    still grow into a stop string (or a marker the format rewrites) held back until it is decided."""

    def __init__(self, stops: list[str], parse: Callable[[str], str], holdback: list[str]):
        self.stops, self.parse, self.holdback = [s for s in stops if s], parse, [*stops, *holdback]
        self.raw, self.shown, self.stopped = "", "", False

    def feed(self, piece: str) -> str:
        """Adds generated text; returns the newly visible part."""
        self.raw += piece
        cuts = [i for i in (self.raw.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.raw, self.stopped = self.raw[: min(cuts)], True
            return self._show(self.parse(self.raw))
        return self._show(self.parse(self.raw[: len(self.raw) - _held_back(self.raw, self.holdback)]))

    def finish(self) -> tuple[str, str]:
        """(last visible piece, whole answer)."""
        answer = self.parse(self.raw)
        return self._show(answer), answer

    def _show(self, text: str) -> str:
        # parse may strip, so a later text extends an earlier one; anything else waits for finish().
        if not text.startswith(self.shown) or len(text) == len(self.shown):
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new


@dataclass(eq=False)  # hashed by identity: the engine keeps a set of them
class _Job:
    """A request inside the engine: its prompt ids, how to decode, and where its output goes."""

    served: ServedModel
    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    output: _TextOutput
    handle: Handle
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    decoded: str = ""
    done: bool = False

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's last logits."""
        params = SamplingParams(self.max_tokens, self.sampling.temperature, self.sampling.top_p)
        return pick_token(logits, params, self.generator)

    def advance(self, token: int, eos_ids: set[int]) -> str | None:
        """Takes the next token and streams its text; returns the finish reason once the request is done."""
        if self.handle.cancelled.is_set():
            return "cancelled"
        self.tokens.append(token)
        if token in eos_ids:
            return "stop"
        text = self.served.loaded.tokenizer.decode(self.tokens, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # a multi-byte character still being spelled out by byte tokens
            piece, self.decoded = text[len(self.decoded) :], text
            self._emit(self.output.feed(piece))
        if self.output.stopped:
            return "stop"
        return "length" if len(self.tokens) >= self.max_tokens else None

    def _emit(self, text: str) -> None:
        if text:
            self.handle._emit(Event(text=text))

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        last, answer = self.output.finish()
        counts = {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens)}
        self.handle._emit(Event(last, reason, answer, error=error, **counts))


@dataclass
class EngineStats:
    """Counters, for /health and tests."""

    batches: int = 0  # continuous: times the batch started from empty
    largest_batch: int = 0
    joined: int = 0  # continuous: requests that joined a batch already running
    completed: int = 0
    cancelled: int = 0
    failed: int = 0


BATCHING = ("continuous", "static")


class Engine:
    """Serves one or more models (see load_served_models) to concurrent requests from a worker thread.

    Args:
        models: What to serve; all share one underlying model (adapters of one base) or there is one.
        max_batch: Requests of the same model decoded together.
        max_pending: Requests admitted at once (waiting or generating); one more raises QueueFullError.
        default_max_tokens: Tokens generated when a request gives no max_tokens (within the context).
        batching: "continuous": a queued request joins the running batch at the next token and a finished one
            leaves it at once; "static": a batch is formed from the queue and runs until its last request ends
            (the behaviour before continuous batching, kept to compare). A model whose KV cache cannot be
            realigned per row (sliding-window or linear-attention layers) is served static.
    """

    def __init__(
        self,
        models: list[ServedModel],
        max_batch: int = 8,
        max_pending: int = 256,
        default_max_tokens: int = 512,
        batching: str = "continuous",
    ):
        if not models:
            raise AiftError("no model to serve")
        if max_batch < 1 or max_pending < 1:
            raise AiftError(f"max_batch and max_pending must be at least 1 (got {max_batch}, {max_pending})")
        if batching not in BATCHING:
            raise AiftError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.models = {m.name: m for m in models}
        self.max_batch, self.max_pending, self.default_max_tokens = max_batch, max_pending, default_max_tokens
        if batching == "continuous" and not supports_running_batch(models[0].loaded.model):
            log.info("this model's KV cache has layers a running batch cannot realign: batching is static")
            batching = "static"
        self.batching = batching
        self.created = int(time.time())
        self.stats = EngineStats()
        # held by the worker while it runs the model: a whole batch (static) or one step (continuous)
        self.model_lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._pending = 0
        self._jobs: set[_Job] = set()  # admitted and not finished
        self._wake = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None

    # -- submitting ---------------------------------------------------------------------------------------------

    def submit_chat(
        self, model: str, messages: list[dict], sampling: Sampling, loop: asyncio.AbstractEventLoop | None = None
    ) -> Handle:
        """Queues an answer to a conversation ending with a user message, in the model's prompt format."""
        served = self._served(model)
        loaded = served.loaded
        prompt = build_prompt(loaded, messages)
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        fmt, tok = loaded.prompt_format, loaded.tokenizer
        stops = [*fmt.stop_strings(tok), *sampling.stop]
        output = _TextOutput(stops, lambda text: fmt.parse_answer(text, tok), list(_EXTRA_MARKERS))
        return self._submit(served, ids, sampling, output, loop)

    def submit_text(
        self, model: str, prompt: str, sampling: Sampling, loop: asyncio.AbstractEventLoop | None = None
    ) -> Handle:
        """Queues a plain continuation of `prompt` (no prompt format), cut only at EOS and `sampling.stop`."""
        served = self._served(model)
        ids = served.loaded.tokenizer(prompt)["input_ids"]
        return self._submit(served, ids, sampling, _TextOutput(list(sampling.stop), lambda text: text, []), loop)

    def context_length(self, model: str) -> int:
        """Tokens the model attends over (prompt plus answer)."""
        loaded = self._served(model).loaded
        return int(getattr(loaded.model.config, "max_position_embeddings", None) or loaded.tokenizer.model_max_length)

    def _served(self, model: str) -> ServedModel:
        if model not in self.models:
            raise UnknownModelError(f"the model {model!r} does not exist; served: {', '.join(self.models)}")
        return self.models[model]

    def _submit(self, served, ids, sampling, output, loop) -> Handle:
        context = self.context_length(served.name)
        room = context - len(ids)
        if room < 1:
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens, but the prompt has {len(ids)} tokens"
            )
        max_tokens = sampling.max_tokens or min(self.default_max_tokens, room)
        if max_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens; the prompt has {len(ids)} tokens "
                f"and max_tokens asks for {max_tokens} more"
            )
        handle = Handle(loop)
        handle.prompt_tokens = len(ids)
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator()
            if sampling.seed is None:
                generator.seed()  # a fresh random seed
            else:
                generator.manual_seed(sampling.seed)
        job = _Job(served, ids, sampling, max_tokens, output, handle, generator)
        with self._wake:
            if self._closing:
                raise QueueFullError("the server is shutting down")
            if self._pending >= self.max_pending:
                raise QueueFullError(f"too many requests: {self._pending} are waiting or generating; retry later")
            self._pending += 1
            self._jobs.add(job)
            self._queue.append(job)
            self._wake.notify()
        return handle

    @property
    def pending(self) -> int:
        """Requests waiting or generating."""
        return self._pending

    # -- the worker ---------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Starts the worker thread (once)."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="aift-serve-engine", daemon=True)
            self._worker.start()
        return self

    def close(self) -> None:
        """Stops the worker; requests queued or generating end as cancelled."""
        with self._wake:
            self._closing = True
            for job in self._jobs:
                job.handle.cancel()
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join()
        for job in list(self._queue):
            self._finish(job, "cancelled")
        self._queue.clear()

    def _work(self) -> None:
        if self.batching == "continuous":
            self._work_continuous()
            return
        while (batch := self._next_batch()) is not None:
            with self.model_lock:
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
                try:
                    self._run_batch(batch)
                except Exception as e:  # noqa: BLE001 - the requests get the error; the server keeps serving
                    log.exception("generation failed")
                    for job in batch:
                        self._finish(job, "error", e)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest queued request and up to max_batch - 1 more for the same model, in arrival order."""
        with self._wake:
            while True:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return None
                first = self._queue.popleft()
                if first.handle.cancelled.is_set():
                    self._finish(first, "cancelled")
                    continue
                batch = [first]
                for job in list(self._queue):
                    if len(batch) == self.max_batch:
                        break
                    if job.served.name == first.served.name:
                        self._queue.remove(job)
                        batch.append(job)
                return batch

    def _finish(self, job: _Job, reason: str, error: BaseException | None = None) -> None:
        if job.done:
            return
        job.done = True
        if reason == "cancelled":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.failed += 1
        else:
            self.stats.completed += 1
        job.finish(reason, error)
        with self._wake:
            self._pending -= 1
            self._jobs.discard(job)

    def _run_batch(self, batch: list[_Job]) -> None:
        """Decodes the batch together; each request finishes (and streams its end) as soon as it is done."""
        loaded = batch[0].served.loaded
        eos_ids = set(eos_token_ids(loaded.model, loaded.tokenizer))
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0

        def next_token(row: int, logits: torch.Tensor) -> int | None:
            job = batch[row]
            token = job.pick(logits)
            reason = job.advance(token, eos_ids)
            if reason:
                self._finish(job, reason)
                return None
            return token

        with adapter_active(batch[0].served):
            decode(loaded.model, [job.prompt_ids for job in batch], next_token, pad_token_id=pad_id)

    # -- continuous batching ------------------------------------------------------------------------------------

    def _work_continuous(self) -> None:
        """One running batch: at each token boundary queued requests join it and finished ones leave it."""
        rows: list[_Job] = []
        batch, eos_ids, logits = None, set(), None
        while (joining := self._joining(rows)) is not None:
            served = (rows or joining)[0].served
            try:
                if not rows:
                    (batch, eos_ids), logits = self._start_batch(served), None
                if joining:
                    with self.model_lock, adapter_active(served):
                        new = batch.add([job.prompt_ids for job in joining])
                    logits = new if logits is None else torch.cat([logits, new])
                    self.stats.joined += len(joining) if rows else 0
                    rows += joining
                    self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
                tokens, keep = self._pick(rows, logits, eos_ids)
                batch.keep(keep)
                rows = [rows[row] for row in keep]
                if rows:
                    with self.model_lock, adapter_active(served):
                        logits = batch.step(tokens)
            except Exception as e:  # noqa: BLE001 - the requests get the error; the server keeps serving
                log.exception("generation failed")
                for job in {*rows, *joining}:
                    self._finish(job, "error", e)
                rows = []

    def _joining(self, rows: list[_Job]) -> list[_Job] | None:
        """The queued requests that join the running batch now, up to max_batch rows in all: in arrival order, for
        the running batch's model, up to the first request for another (which waits for this batch to drain, so
        no model starves). With no rows, waits for a request; None once the engine is closing and nothing runs."""
        with self._wake:
            while not rows and not self._queue and not self._closing:
                self._wake.wait()
            if self._closing:
                return [] if rows else None  # the running rows were cancelled: the next step ends them
            model = rows[0].served.name if rows else None
            joining: list[_Job] = []
            while self._queue and len(rows) + len(joining) < self.max_batch:
                job = self._queue[0]
                if job.handle.cancelled.is_set():
                    self._finish(self._queue.popleft(), "cancelled")
                    continue
                if model is not None and job.served.name != model:
                    break
                model = job.served.name
                joining.append(self._queue.popleft())
            return joining

    def _start_batch(self, served: ServedModel) -> tuple[RunningBatch, set[int]]:
        """An empty batch for the served model, and its EOS ids."""
        self.stats.batches += 1
        loaded = served.loaded
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        return RunningBatch(loaded.model, pad_token_id=pad_id), set(eos_token_ids(loaded.model, loaded.tokenizer))

    def _pick(self, rows: list[_Job], logits: torch.Tensor, eos_ids: set[int]) -> tuple[list[int], list[int]]:
        """Each row's next token; finished rows end here. (tokens of the rows that go on, their indices)"""
        tokens, keep = [], []
        for row, job in enumerate(rows):
            token = job.pick(logits[row])
            reason = job.advance(token, eos_ids)
            if reason:
                self._finish(job, reason)
            else:
                tokens.append(token)
                keep.append(row)
        return tokens, keep
