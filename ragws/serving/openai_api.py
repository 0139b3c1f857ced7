"""OpenAI's chat-completions API over the OCR backend: ``GET /v1/models``,
``POST /v1/chat/completions``.

Tools that call a remote vision model through OpenAI's API (docling's ``ApiVlmOptions``,
MinerU's ``vlm-http-client``, olmOCR's ``--server``, LangChain's ``ChatOpenAI``, LlamaIndex's
OpenAI-like classes) reach ragws with one URL change. A chat request becomes an OCR request
(:class:`~ragws.pipeline.ocr.vlm.OcrOptions`) for the backend that serves the ``ocr`` frame, so its
sequence joins the same continuous batch as the WebSocket's, under the same admission cap, API key,
deadlines, fair share, metrics and cancellation (a client that disconnects cancels the task
that awaits its tokens, and the engine frees the KV slot before its next step).

What is OpenAI's here and what is ragws's:

* requests and answers have OpenAI's shapes; a field this server does not use is ignored
  (and logged once), so clients written for vLLM work unchanged;
* every problem with a request is a 400, as OpenAI answers, with OpenAI's error body
  ``{"error": {"message", "type", "param", "code"}}``; ``code`` is ragws's error code
  (``bad_request``, ``too_large``, ...), ``overloaded`` is a 429 with ``Retry-After``;
* no URL is ever fetched: images travel inline as ``data:`` URLs;
* ``temperature`` left out means greedy (the checkpoint's generation config does not sample),
  not OpenAI's 1.0;
* ``repetition_penalty`` (vLLM's extension) left out is the checkpoint's generation config's,
  as in ``generate`` and vLLM; so is ``no_repeat_ngram_size`` (HF's; top-level, or in
  ``vllm_xargs`` as MinerU's client sends it);
* the deadline of the ``ocr`` frame's ``deadline_ms`` is the ``X-Deadline-Ms`` header.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ragws.engine.sequence import FinishReason, Sampling, TokenEvent
from ragws.errors import ErrorCode, RequestError, bad_request, shown, too_large
from ragws.pipeline.ocr.backend import OcrOptions, read_text
from ragws.runtime.deadlines import MAX_DEADLINE_MS, DeadlineExceeded, deadline_scope
from ragws.runtime.fairness import client_scope, connection_key
from ragws.serving.outcome import request_ended
from ragws.serving.services import Services

log = logging.getLogger(__name__)

MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
#: The request type in ``ragws_requests_total`` and in request log lines.
KIND = "chat_completions"
DEADLINE_HEADER = "X-Deadline-Ms"
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp"})
#: Images per request: both backends read one page image at a time.
MAX_IMAGES = 1
#: Temperatures below this are greedy (as in vLLM): dividing logits by less overflows.
MIN_TEMPERATURE = 1e-5
MAX_REPETITION_PENALTY = 2.0
MAX_NGRAM = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
#: Bodies larger than this are parsed (JSON, base64) off the event loop.
INLINE_PARSE_BYTES = 1 << 20
#: What is read from a request body; any other field is ignored (and logged once).
FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "vllm_xargs",
        "stop",
        "n",
        "stream",
        "stream_options",
        "skip_special_tokens",
        "ignore_eos",
    }
)
RETRY_AFTER_S = "1"
STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.TOO_LARGE: 400,  # OpenAI answers 400 for every request it cannot take
    ErrorCode.OVERLOADED: 429,
    ErrorCode.UNSUPPORTED: 501,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}
ERROR_TYPES = {400: "invalid_request_error", 408: "invalid_request_error", 429: "rate_limit_error"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat completion request, read and checked: what the OCR backend is asked."""

    image: bytes
    options: OcrOptions
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    ignored: tuple[str, ...] = ()  # body fields this server does not use


# --- request ---------------------------------------------------------------------------------


def parse_body(raw: bytes, max_image_bytes: int) -> ChatRequest:
    """A request body (JSON bytes) → :class:`ChatRequest`; :class:`RequestError` if it is
    not one this server can answer."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"the body is not JSON: {shown(str(exc))}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}")
    return parse_chat(body, max_image_bytes)


def parse_chat(body: Mapping[str, Any], max_image_bytes: int) -> ChatRequest:
    """A chat completion request's JSON object → :class:`ChatRequest`."""
    system, text, images = _read_messages(body.get("messages"))
    if len(images) > MAX_IMAGES:
        raise bad_request(f"this model reads one image per request; the request has {len(images)}")
    if not images:
        raise bad_request(
            "the request has no image: send the page as an 'image_url' part whose url is a "
            "data: URL (data:image/png;base64,...)"
        )
    n = _integer(body, "n")
    if n not in (None, 1):
        raise bad_request(f"'n' must be 1: this server returns one choice, got {n}")
    max_tokens = _integer(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", low=1)
    stream = _boolean(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object")
    include_usage = stream and _boolean(stream_options or {}, "include_usage", False)
    return ChatRequest(
        image=_data_url(images[0], max_image_bytes),
        options=OcrOptions(
            max_tokens=max_tokens,
            prompt=text,
            system=system,
            sampling=_sampling(body),
            repetition_penalty=_repetition_penalty(body),
            no_repeat_ngram_size=_no_repeat_ngram_size(body),
            stop=_stop(body.get("stop")),
            skip_special_tokens=_boolean(body, "skip_special_tokens", True),
            ignore_eos=_boolean(body, "ignore_eos", False),  # vLLM's, for benchmarks
        ),
        stream=stream,
        include_usage=include_usage,
        ignored=tuple(sorted(str(k) for k in body if k not in FIELDS)),
    )


def _read_messages(messages: Any) -> tuple[str | None, str | None, list[str]]:
    """The system text, the user's text and the user's image URLs (None: no such text)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages")
    system: list[str] = []
    text: list[str] = []
    images: list[str] = []
    users = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system += _texts(content, where, images=None)
        elif role == "user":
            users += 1
            text += _texts(content, where, images=images)
        elif isinstance(role, str):
            raise bad_request(
                f"{where}: role {shown(role)} is not taken: this OCR model answers one user "
                "turn, with an optional system message"
            )
        else:
            raise bad_request(f"{where} has no 'role'")
    if not users:
        raise bad_request("the request has no user message")
    joined = "\n".join(text).strip()
    instructions = "\n".join(system).strip()
    return instructions or None, joined or None, images


def _texts(content: Any, where: str, images: list[str] | None) -> list[str]:
    """The text parts of one message's content; its image URLs go to ``images`` (None: the
    message may not have any)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts")
    texts: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string")
            texts.append(part["text"])
        elif kind == "image_url" and images is not None:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image  # "detail" is ignored
            if not isinstance(url, str):
                raise bad_request(f"{at}.image_url.url must be a string")
            images.append(url)
        elif kind == "image_url":
            raise bad_request(f"{at}: images go in a user message")
        else:
            raise bad_request(
                f"{at}: part type {shown(kind)} is not taken; send 'text' and 'image_url' parts"
            )
    return texts


def _data_url(url: str, max_bytes: int) -> bytes:
    """The image bytes of a ``data:`` URL. Nothing else is read: no URL is ever fetched."""
    scheme = url[:8].lower()
    if scheme.startswith(("http://", "https://")):
        raise bad_request(
            "remote image URLs are never fetched by this server: send the image inline as a "
            "data: URL (data:image/png;base64,...)"
        )
    if not scheme.startswith("data:"):
        raise bad_request(
            f"image_url must be a data: URL (data:image/png;base64,...), got {shown(url[:40])}"
        )
    header, comma, data = url.partition(",")
    if not comma:
        raise bad_request("the data: URL has no ',' before its data")
    media, *params = header[len("data:") :].split(";")
    if media.strip().lower() not in IMAGE_TYPES:
        raise bad_request(f"the image must be PNG, JPEG or WebP, got {shown(media)}")
    if "base64" not in (p.strip().lower() for p in params):
        raise bad_request("the data: URL must be base64 (data:image/png;base64,...)")
    if len(data) // 4 * 3 > max_bytes:
        raise too_large(
            f"the image is about {len(data) // 4 * 3} bytes; the limit is {max_bytes} "
            "(max_frame_bytes)"
        )
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data: URL's data is not valid base64") from None


def _sampling(body: Mapping[str, Any]) -> Sampling | None:
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("'top_p' must be in (0, 1], got 0")
    top_k = _integer(body, "top_k", low=-1)
    seed = _integer(body, "seed", low=-(2**63), high=2**64 - 1)  # what a generator takes
    if temperature is None or temperature < MIN_TEMPERATURE:
        return None  # greedy, the engine's exact path
    return Sampling(
        temperature=temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=max(0, top_k or 0),  # -1 and 0 both mean every token, as in vLLM
        seed=seed,
    )


def _repetition_penalty(body: Mapping[str, Any]) -> float | None:
    """vLLM's extension: > 1 makes tokens already in the prompt or output less likely; left
    out, the checkpoint's generation config's."""
    penalty = _number(body, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY)
    if penalty == 0.0:
        raise bad_request("'repetition_penalty' must be in (0, 2], got 0")
    return penalty


def _no_repeat_ngram_size(body: Mapping[str, Any]) -> int | None:
    """HF's ``no_repeat_ngram_size``, top-level or in vLLM's ``vllm_xargs`` (where MinerU's
    client sends it); left out, the checkpoint's generation config's."""
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise bad_request("'vllm_xargs' must be an object")
    for source in (body, xargs or {}):
        if source.get("no_repeat_ngram_size") is not None:
            return _integer(source, "no_repeat_ngram_size", low=0, high=MAX_NGRAM)
    return None


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(
            f"'stop' takes at most {MAX_STOP_STRINGS} strings of {MAX_STOP_CHARS} characters"
        )
    return tuple(stops)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name!r} must be a number, got {shown(value)}")
    if not low <= value <= high:
        raise bad_request(f"{name!r} must be in [{low:g}, {high:g}], got {value}")
    return float(value)


def _integer(
    body: Mapping[str, Any], name: str, low: int | None = None, high: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name!r} must be an integer, got {shown(value)}")
    if low is not None and value < low:
        raise bad_request(f"{name!r} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise bad_request(f"{name!r} must be at most {high}, got {shown(value)}")
    return value


def _boolean(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name!r} must be true or false, got {shown(value)}")
    return value


# --- answers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """What every object of one answer repeats."""

    id: str
    created: int
    model: str

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, text: str, last: TokenEvent) -> dict[str, Any]:
        """The whole answer (``stream: false``)."""
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason(last),
        }
        return {**self.head("chat.completion"), "choices": [choice], "usage": usage(last)}

    def chunk(
        self, delta: dict[str, Any], reason: str | None = None, usage_field: bool = False
    ) -> dict[str, Any]:
        """One streamed chunk; ``usage_field``: carry ``"usage": null``, as OpenAI does in
        every chunk of a stream that asked for the usage."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        chunk = {**self.head("chat.completion.chunk"), "choices": [choice]}
        if usage_field:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, last: TokenEvent) -> dict[str, Any]:
        return {**self.head("chat.completion.chunk"), "choices": [], "usage": usage(last)}


def finish_reason(event: TokenEvent) -> str:
    """``length`` when ``max_tokens`` ran out; ``stop`` when the text ended (the model said
    so, or a stop string did)."""
    return "length" if event.finish_reason is FinishReason.LENGTH else "stop"


def usage(event: TokenEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def error_body(message: str, status: int, code: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(exc: RequestError, status: int | None = None) -> web.Response:
    status = status or STATUS[exc.code]
    retry = exc.code in (ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE)
    response = web.json_response(
        error_body(exc.message, status, exc.code.value),
        status=status,
        headers={"Retry-After": RETRY_AFTER_S} if retry else None,
    )
    if exc.code in (ErrorCode.TOO_LARGE, ErrorCode.OVERLOADED) or status == 408:
        response.force_close()  # do not read (or linger over) the rest of a refused body
    return response


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


# --- handlers --------------------------------------------------------------------------------


class OpenAiApi:
    """The handlers; ``services`` is the application's key to the shared services."""

    def __init__(self, services: web.AppKey[Services]) -> None:
        self.services = services
        self.created = int(time.time())
        self._logged: set[str] = set()  # ignored fields already logged

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(MODELS_PATH, self.models),
            web.get(MODELS_PATH + "/{model}", self.model),
            web.post(CHAT_PATH, self.chat),
        ]

    def _cards(self, services: Services) -> list[dict[str, Any]]:
        if services.ocr is None:
            return []
        return [
            {
                "id": services.ocr.name,
                "object": "model",
                "created": self.created,
                "owned_by": "ragws",
            }
        ]

    async def models(self, request: web.Request) -> web.Response:
        cards = self._cards(request.app[self.services])
        return web.json_response({"object": "list", "data": cards})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in self._cards(request.app[self.services]):
            if card["id"] == name:
                return web.json_response(card)
        message = f"this server serves no model {shown(name)}"
        return web.json_response(error_body(message, 404, "model_not_found"), status=404)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: read, check, admit, then answer whole or streamed.

        The body is read before admission, under ``body_timeout_s`` and the receive budget,
        so a client sending slowly holds a connection, never one of ``max_concurrent``."""
        services = request.app[self.services]
        started = time.monotonic()
        model = services.ocr.name if services.ocr is not None else ""
        completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model)
        peer = request.remote or "unknown"
        outcome = "ok"
        try:
            chat = await self._read(request, services)
            if services.ocr is None:
                raise RequestError(
                    ErrorCode.UNSUPPORTED, "no OCR model is loaded (--ocr-model none)"
                )
            deadline_s = _deadline(request)
            if not services.admission.try_acquire():
                outcome = "overloaded"
                return error_response(
                    RequestError(ErrorCode.OVERLOADED, services.admission.overloaded_message())
                )
            try:
                with deadline_scope(deadline_s), client_scope(connection_key("http", peer)):
                    events = services.ocr.generate(chat.image, chat.options)
                    async with contextlib.aclosing(events):  # closing aborts the sequence
                        if chat.stream:
                            response, outcome = await _stream(request, events, completion, chat)
                            return response
                        return await _whole(events, completion)
            finally:
                services.admission.release()
        except _BodyTimeout as exc:
            outcome = "timeout"
            return error_response(RequestError(ErrorCode.TIMEOUT, str(exc)), status=408)
        except RequestError as exc:
            outcome = exc.code.value
            return error_response(exc)
        except DeadlineExceeded as exc:
            outcome = "timeout"
            return error_response(RequestError(ErrorCode.TIMEOUT, str(exc)))
        except asyncio.CancelledError:  # the client went away; its sequence is aborted
            outcome = "cancelled"
            raise
        finally:
            request_ended(
                log,
                services.metrics,
                kind=KIND,
                request_id=completion.id,
                peer=peer,
                outcome=outcome,
                started=started,
            )

    async def _read(self, request: web.Request, services: Services) -> ChatRequest:
        """The body, read in full within ``body_timeout_s``, its size held against the receive
        budget while it arrives, then parsed (off the loop when large)."""
        settings = services.settings
        limit = request.client_max_size
        declared = request.content_length
        if declared is not None and declared > limit:
            raise too_large(f"the body is {declared} bytes; the limit is {limit}")
        size = limit if declared is None else declared
        budget = services.receive
        if not budget.try_reserve(size):
            raise RequestError(
                ErrorCode.OVERLOADED,
                f"the server is receiving {budget.limit / 2**20:.0f} MiB of uploads already "
                "(max_receive_buffer_mb); retry later",
            )
        with budget.reserved(size):
            try:
                raw = await asyncio.wait_for(request.read(), settings.body_timeout_s)
            except asyncio.TimeoutError:
                raise _BodyTimeout(
                    f"the request body did not arrive within {settings.body_timeout_s:g} s "
                    "(body_timeout_s)"
                ) from None
            except web.HTTPRequestEntityTooLarge:
                raise too_large(f"the body is larger than {limit} bytes") from None
            if len(raw) > INLINE_PARSE_BYTES:
                loop = asyncio.get_running_loop()
                chat = await loop.run_in_executor(None, parse_body, raw, settings.max_frame_bytes)
            else:
                chat = parse_body(raw, settings.max_frame_bytes)
        self._log_ignored(chat.ignored)
        return chat

    def _log_ignored(self, fields: tuple[str, ...]) -> None:
        """Say once per field name that it is ignored (a bounded set: names are the client's)."""
        for name in fields:
            if name not in self._logged and len(self._logged) < 256:
                self._logged.add(name)
                log.info(
                    "%s: field %s is not used by this server and is ignored (said once)",
                    CHAT_PATH,
                    shown(name),
                )


class _BodyTimeout(Exception):
    """The request body did not arrive within ``body_timeout_s``."""


def _deadline(request: web.Request) -> float | None:
    """``X-Deadline-Ms`` in seconds, or None."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(f"{DEADLINE_HEADER} must be a number, got {shown(raw)}") from None
    if not 0 < value <= MAX_DEADLINE_MS:
        raise bad_request(f"{DEADLINE_HEADER} must be in (0, {MAX_DEADLINE_MS}], got {raw}")
    return value / 1000


async def _whole(events: AsyncIterator[TokenEvent], completion: Completion) -> web.Response:
    text, last = await read_text(events)
    return web.json_response(completion.body(text, last))


async def _stream(
    request: web.Request,
    events: AsyncIterator[TokenEvent],
    completion: Completion,
    chat: ChatRequest,
) -> tuple[web.StreamResponse, str]:
    """Server-Sent Events: a chunk with the role, one per text delta, one with the finish
    reason, the usage when asked, then ``[DONE]``. The first event is awaited before the
    headers go out, so that a bad image or a passed deadline still gets its status."""
    event = await anext(events)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    keep_usage = chat.include_usage
    try:
        await response.write(
            sse(completion.chunk({"role": "assistant", "content": ""}, None, keep_usage))
        )
        while True:
            if event.text:
                await response.write(
                    sse(completion.chunk({"content": event.text}, None, keep_usage))
                )
            if event.finish_reason is not None:
                break
            event = await anext(events)
        outcome = "ok"
        if event.error is not None:
            outcome = "internal"
            message = f"ocr model failed: {event.error}"
            await response.write(sse(error_body(message, 500, ErrorCode.INTERNAL.value)))
        else:
            reason = finish_reason(event)
            await response.write(sse(completion.chunk({}, reason, keep_usage)))
            if keep_usage:
                await response.write(sse(completion.usage_chunk(event)))
        await response.write(sse("[DONE]"))
        await response.write_eof()
    except ConnectionError:  # the client went away mid-stream; closing the events aborts
        return response, "cancelled"
    return response, outcome


def install(app: web.Application, services: web.AppKey[Services]) -> None:
    """Serve the API on ``app``, whose ``services`` key holds the running services."""
    app.router.add_routes(OpenAiApi(services).routes())
