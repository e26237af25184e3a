"""An OpenAI-compatible HTTP API over an aift.serve.engine.Engine: /v1/models, /v1/chat/completions and
/v1/completions, streamed as server-sent events in OpenAI's chunk format when asked.

app = create_app(Engine(load_served_models("smollm2-135m-instruct")), api_key="secret")
uvicorn.run(app, host="127.0.0.1", port=8000)

Errors are OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (including
a prompt longer than the context), 401 for a missing or wrong key, 404 for an unknown model, 429 when the queue
is full. Neither keys nor prompts are logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aift.data import DataError
from aift.serve.engine import (
    ContextLengthError,
    Engine,
    Event,
    Handle,
    QueueFullError,
    Sampling,
    UnknownModelError,
)
from aift.serve.schemas import ChatCompletionRequest, CompletionRequest
from aift.serve.tools import ToolCallStream, answer_message, request_messages, wants_tools

log = logging.getLogger(__name__)

# How often a request waiting for its next token checks whether its client has gone.
_DISCONNECT_POLL_SECONDS = 0.5


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _as_api_error(e: Exception) -> ApiError:
    """The HTTP answer for an engine error."""
    if isinstance(e, UnknownModelError):
        return ApiError(404, str(e), "invalid_request_error", "model", "model_not_found")
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), "rate_limit_error", None, "queue_full")
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(e, DataError):  # a conversation the prompt format cannot take (roles, order, empty content)
        return ApiError(400, str(e), "invalid_request_error", "messages", None)
    return ApiError(500, "internal error while generating; see the server log", "server_error")


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return ApiError(400, message, "invalid_request_error", param, None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception):
        log.error("unexpected error: %s", type(exc).__name__)  # no traceback in the answer, nor the prompt in the log
        return _as_api_error(exc).response()


def _key_check(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), expected):  # constant time: the key cannot be guessed by timing
            raise ApiError(401, "missing or invalid API key", "invalid_request_error", None, "invalid_api_key")

    return check


def _sampling(body: ChatCompletionRequest | CompletionRequest) -> Sampling:
    return Sampling(body.token_limit(), body.temperature, body.top_p, body.seed, body.stops())


def _usage(event: Event) -> dict:
    total = event.prompt_tokens + event.completion_tokens
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens, "total_tokens": total}


def _finish_reason(event: Event) -> str:
    return event.finish_reason if event.finish_reason in ("stop", "length") else "stop"


async def _events(handle: Handle, request: Request) -> AsyncIterator[Event]:
    """A request's events until the last one; a client that goes away cancels its generation."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(handle.next_event(), _DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield event
            if event.finish_reason:
                return
    finally:
        handle.cancel()  # no-op when it has finished; stops the worker on this row when the client has gone


async def _last_event(handle: Handle, request: Request) -> Event:
    async for event in _events(handle, request):
        if event.finish_reason:
            if event.finish_reason == "error":
                raise _as_api_error(event.error or RuntimeError())
            return event
    raise ApiError(499, "client closed the request", "invalid_request_error")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _submit(submit, *args) -> Handle:
    try:
        return submit(*args, loop=asyncio.get_running_loop())
    except (UnknownModelError, QueueFullError, DataError) as e:
        raise _as_api_error(e) from None


class _Api:
    """The endpoints, closed over one engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(name) for name in self.engine.models]}

    def model(self, model: str) -> dict:
        if model not in self.engine.models:
            raise _as_api_error(UnknownModelError(f"the model {model!r} does not exist"))
        return self._model_card(model)

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.engine.created, "owned_by": "aift"}

    async def chat(self, body: ChatCompletionRequest, request: Request):
        messages = request_messages([m.message() for m in body.messages], body.tools, body.tool_choice)
        tools = wants_tools(body.tools, body.tool_choice)
        handle = _submit(self.engine.submit_chat, body.model, messages, _sampling(body))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return self._stream(handle, request, meta, body.wants_usage_chunk(), chat=True, tools=tools)
        event = await _last_event(handle, request)
        message, calls = answer_message(event.answer, tools)
        finish = "tool_calls" if calls else _finish_reason(event)
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(event)}

    async def completions(self, body: CompletionRequest, request: Request):
        handle = _submit(self.engine.submit_text, body.model, body.text(), _sampling(body))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return self._stream(handle, request, meta, body.wants_usage_chunk(), chat=False)
        event = await _last_event(handle, request)
        choice = {"index": 0, "text": event.answer, "finish_reason": _finish_reason(event), "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": _usage(event)}

    def _stream(
        self, handle: Handle, request: Request, meta: dict, usage: bool, chat: bool, tools: bool = False
    ) -> StreamingResponse:
        kind = "chat.completion.chunk" if chat else "text_completion"
        calls = ToolCallStream() if tools else None  # content held back from a <tool_call> on

        def chunk(text: str | None, finish: str | None, role: bool = False, tool_calls: list | None = None) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                if tool_calls:
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({**meta, "object": kind, "choices": [choice]})

        async def body() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk("", None, role=True)
                async for event in _events(handle, request):
                    if event.finish_reason == "error":
                        yield _sse(_as_api_error(event.error or RuntimeError()).body())
                        return
                    text = calls.feed(event.text) if calls and event.text else event.text
                    if text:
                        yield chunk(text, None)
                    if event.finish_reason:
                        rest, tool_calls = calls.finish(event.answer) if calls else ("", [])
                        if rest or tool_calls:
                            yield chunk(rest or None, None, tool_calls=tool_calls)
                        yield chunk(None, "tool_calls" if tool_calls else _finish_reason(event))
                        if usage:
                            yield _sse({**meta, "object": kind, "choices": [], "usage": _usage(event)})
                        yield _sse("[DONE]")
            finally:
                handle.cancel()  # the client went away mid-stream (no-op after the end)

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started with the app if it is not running yet).

    Args:
        engine: The generation engine; its models are listed by /v1/models and chosen by each request's `model`.
        api_key: When set, every /v1 request needs `Authorization: Bearer <api_key>`.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield

    app = FastAPI(title="aift", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    api = _Api(engine)
    app.state.engine = engine

    @app.get("/health")
    def health() -> dict:
        stats = engine.stats
        return {"status": "ok", "pending": engine.pending, "stats": stats.__dict__}

    router = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(api_key))])
    router.add_api_route("/models", api.models, methods=["GET"])
    router.add_api_route("/models/{model:path}", api.model, methods=["GET"])
    router.add_api_route("/chat/completions", api.chat, methods=["POST"])
    router.add_api_route("/completions", api.completions, methods=["POST"])
    app.include_router(router)
    return app
