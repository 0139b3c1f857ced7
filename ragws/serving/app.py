"""The routes and their thin handlers.

Handlers parse, check admission, hand off to a service and shape the answer. They never touch
model frameworks; everything slow runs on the services' threads. The application and its
services are built by :mod:`ragws.bootstrap`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from ragws import __version__
from ragws.config import truthy
from ragws.engine.sequence import TokenEvent
from ragws.errors import ErrorCode, RequestError
from ragws.metrics import CONTENT_TYPE
from ragws.pipeline.ocr.backend import OcrOptions, check_mode, read_text
from ragws.pipeline.ocr.vlm import OcrService
from ragws.pipeline.parse import ParsedDocument, ParsedPage
from ragws.runtime.deadlines import MAX_DEADLINE_MS, DeadlineExceeded, deadline_scope
from ragws.runtime.fairness import client_scope, connection_key
from ragws.serving import frames, openai_api, protocol, readiness
from ragws.serving.receive import (
    SMALL_MESSAGE_BYTES,
    BoundedWebSocketResponse,
    schedule_trim,
)
from ragws.serving.services import SERVICES, SETTINGS
from ragws.serving.session import Session

log = logging.getLogger(__name__)
T = TypeVar("T")

HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.UNSUPPORTED: 501,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}
RETRY_AFTER_S = "1"
#: Fields a form may have (aiohttp's limit); ragws's forms have a dozen.
MAX_FORM_FIELDS = 1000
#: Bytes a connection buffers below the session's send queue (aiohttp's own default).
TRANSPORT_BUFFER = 64 * 1024


def static_dir() -> Path | None:
    """The viewer's files: beside the package in a checkout, under share/ when installed."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "static",
        Path(sys.prefix) / "share" / "ragws" / "static",
    ):
        if (candidate / "index.html").is_file():
            return candidate
    return None


def add_routes(app: web.Application) -> None:
    """Every route of the server: WebSocket, health, metrics, the seed's HTTP API, parse,
    readiness, the OpenAI-compatible API and the viewer. The services are read from
    :data:`~ragws.serving.services.SERVICES` when a request comes."""
    readiness.install(app, app[SETTINGS], SERVICES)  # GET /ready, refusals while draining
    openai_api.install(app, SERVICES)  # GET /v1/models, POST /v1/chat/completions
    app.router.add_routes(
        [
            web.get("/ws", ws_handler),
            web.get("/health", health),
            web.get("/metrics", metrics),
            web.post("/doc_layout", doc_layout),
            web.post("/ocr", ocr),
            web.post("/parse", parse),
        ]
    )
    if (static := static_dir()) is not None:
        index = static / "index.html"

        async def viewer(_request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.router.add_get("/", viewer)
        app.router.add_static("/static/", static)


# --- WebSocket ------------------------------------------------------------------------------


async def ws_handler(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    settings = services.settings
    if services.admission.draining:
        # A handshake that reached the server as it stopped listening: not upgraded, so the
        # client retries elsewhere instead of holding a socket that will close at once.
        return _error_response(
            RequestError(ErrorCode.UNAVAILABLE, services.admission.overloaded_message())
        )
    # The send queue is the session's (ragws.serving.outbox); below it, the connection buffers no
    # more than this, so send_queue_bytes is what a slow reader can make us hold.
    buffered = min(TRANSPORT_BUFFER, settings.send_queue_bytes)
    ws = BoundedWebSocketResponse(
        budget=services.receive,
        frame_timeout_s=settings.frame_timeout_s,
        max_msg_size=settings.max_frame_bytes,
        heartbeat=settings.heartbeat_s or None,
        compress=False,  # page images do not compress; deflating them only costs CPU
        writer_limit=buffered,
    )
    await ws.prepare(request)
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=buffered)
    await Session(ws, services, peer=_peer(request), transport=request.transport).run()
    await ws.refused()
    if ws.meter is not None and ws.meter.peak > SMALL_MESSAGE_BYTES:
        schedule_trim()  # a large frame's buffers went with the connection
    return ws


def _peer(request: web.Request) -> str:
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    return f"{peername[0]}:{peername[1]}" if peername else "unknown"


# --- HTTP -----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    model = services.layout.model
    healthy = services.layout.healthy and (services.ocr is None or services.ocr.healthy)
    ocr: dict[str, Any] | None = None
    if services.ocr is not None:
        ocr = {
            "model": services.ocr.name,
            "architecture": services.ocr.architecture,
            "modes": list(services.ocr.modes),
            "page_mode": services.ocr.page_mode,
            "healthy": services.ocr.healthy,
        }
        if isinstance(services.ocr, OcrService):
            limits = services.ocr.limits
            ocr["kv_slots"] = limits.num_slots
            ocr["max_model_len"] = limits.max_model_len
            ocr["kv_cache_mib"] = round(limits.kv_cache_bytes / 2**20, 1)
    return web.json_response(
        {
            "status": "ok" if healthy else "unhealthy",
            "version": __version__,
            "models": services.hello["models"],
            "device": model.device,
            "layout_healthy": services.layout.healthy,
            "layout_batch": {
                "max": services.settings.layout_batch_size,
                "preferred": services.layout.preferred_batch_size,
            },
            "ocr": ocr,
            "inflight": services.admission.inflight,
            "max_concurrent": services.admission.max_concurrent,
            # Frames and bodies still arriving (max_receive_buffer_mb).
            "receive_buffer_bytes": services.receive.held,
            # Serving now (a killed one is being replaced), and tasks waiting for one.
            "document_workers": services.documents.workers,
            "document_tasks_waiting": services.documents.waiting(),
        },
        status=200 if healthy else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _error_response(exc: RequestError, status: int | None = None) -> web.Response:
    retry = exc.code in (ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE)
    headers = {"Retry-After": RETRY_AFTER_S} if retry else None
    return web.json_response(
        {"error": exc.code.value, "message": exc.message},
        status=status or HTTP_STATUS[exc.code],
        headers=headers,
    )


async def _admitted(
    request: web.Request,
    kind: str,
    serve: Callable[[dict[str, Any]], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Run an HTTP request with the same outcomes as a WS request: read its form, then take
    an admission slot, and serve it under the form's ``deadline_ms`` (504 if still queued).

    The body is read first, under ``body_timeout_s`` and with its size taken from the
    receive budget, so that a client sending its body slowly holds a connection, never one
    of the ``max_concurrent`` slots that other clients' work needs."""
    services = request.app[SERVICES]
    outcome = "ok"
    try:
        form = await _read_form(request)
        if not services.admission.try_acquire():
            outcome = "overloaded"
            return _error_response(
                RequestError(ErrorCode.OVERLOADED, services.admission.overloaded_message())
            )
        try:
            deadline_ms = _form_float(form, "deadline_ms", 0.0, 0.0, MAX_DEADLINE_MS)
            deadline_s = deadline_ms / 1000 if deadline_ms else None
            client = connection_key("http", _peer(request))  # each request is a client
            with deadline_scope(deadline_s), client_scope(client):
                return await serve(form)
        finally:
            services.admission.release()
    except BodyTimeout as exc:
        outcome = "timeout"
        response = _error_response(RequestError(ErrorCode.TIMEOUT, str(exc)), status=408)
        response.force_close()  # the rest of the body is not worth waiting for
        return response
    except RequestError as exc:
        outcome = exc.code.value
        response = _error_response(exc)
        if exc.code in (ErrorCode.TOO_LARGE, ErrorCode.OVERLOADED):
            response.force_close()  # do not read (or linger over) a body we refused
        return response
    except DeadlineExceeded as exc:
        outcome = "timeout"
        return _error_response(RequestError(ErrorCode.TIMEOUT, str(exc)))
    except asyncio.CancelledError:  # the client went away; the work is withdrawn
        outcome = "cancelled"
        raise
    finally:
        services.metrics.requests_total.labels(kind, outcome).inc()


class BodyTimeout(Exception):
    """The request body did not arrive within ``body_timeout_s``."""


async def _read_form(request: web.Request) -> dict[str, Any]:
    """The form, read in full within ``body_timeout_s``, its size held against the receive
    budget while it arrives (a chunked body, of unknown size, counts as the largest)."""
    services = request.app[SERVICES]
    settings = services.settings
    if request.content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise protocol.bad_request("send the fields as multipart/form-data")
    limit = request.client_max_size
    declared = request.content_length
    if declared is not None and declared > limit:
        raise protocol.too_large(
            f"body is {declared} bytes; the limit is {limit} (max_pdf_bytes and 1 MiB of fields)"
        )
    size = limit if declared is None else declared
    budget = services.receive
    if not budget.try_reserve(size):
        mib = budget.limit / 2**20
        raise RequestError(
            ErrorCode.OVERLOADED,
            f"the server is receiving {mib:.0f} MiB of uploads already "
            "(max_receive_buffer_mb); retry later",
        )
    with budget.reserved(size):
        try:
            return dict(await asyncio.wait_for(request.post(), settings.body_timeout_s))
        except asyncio.TimeoutError:
            raise BodyTimeout(
                f"the request body did not arrive within {settings.body_timeout_s:g} s "
                "(body_timeout_s)"
            ) from None
        except web.HTTPRequestEntityTooLarge as exc:
            if "fields" in (exc.text or ""):
                raise protocol.too_large(
                    f"the form has more than {MAX_FORM_FIELDS} fields; "
                    "ragws's forms have a dozen at most"
                ) from None
            raise protocol.too_large(
                f"body is larger than {limit} bytes (max_pdf_bytes and 1 MiB of fields)"
            ) from None
        except ValueError as exc:
            raise protocol.bad_request(
                f"malformed multipart body: {protocol.shown(str(exc))}"
            ) from None


def _form_float(form: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise protocol.bad_request(
            f"field {name!r} must be a number, got {protocol.shown(raw)}"
        ) from None
    if not low < value <= high:
        raise protocol.bad_request(f"field {name!r} must be in ({low}, {high}], got {value}")
    return value


async def doc_layout(request: web.Request) -> web.StreamResponse:
    """Seed-compatible ``POST /doc_layout``: a PDF in, every page's layout and image out."""

    async def serve(form: dict[str, Any]) -> web.StreamResponse:
        services = request.app[SERVICES]
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            raise protocol.bad_request("missing file field 'file'")
        data = upload.file.read()
        max_scale = services.settings.max_render_scale
        iou = _form_float(form, "iou_threshold", 0.45, 0.0, 1.0)
        scale_x = _form_float(form, "ratio_x", 2.0, 0.0, max_scale)
        scale_y = _form_float(form, "ratio_y", 2.0, 0.0, max_scale)
        started = time.monotonic()
        layout = services.layout
        plan = await services.documents.open_pdf(data, None)
        try:
            detected = layout.detect_pdf(plan, scale=(scale_x, scale_y), iou=iou, images=True)
            async with contextlib.aclosing(detected):  # a disconnect withdraws queued pages
                pages = [page async for page in detected]
        finally:
            await services.documents.close_pdf(plan)
        return web.json_response(frames.seed_layout_body(pages, started))

    return await _admitted(request, "doc_layout", serve)


async def ocr(request: web.Request) -> web.StreamResponse:
    """Seed-compatible ``POST /ocr``: multipart ``image``, ``mode``, ``max_tokens``, ``stream``.

    ``stream=false`` answers ``{"result": text}``; ``stream=true`` answers Server-Sent Events,
    one ``data: {"token": ...}`` per text delta, then an ``event: done`` with the finish reason
    and usage (clients that listen only to unnamed events see exactly the seed's stream).
    A client that disconnects cancels its sequence, freeing its KV slot.
    """

    async def serve(form: dict[str, Any]) -> web.StreamResponse:
        services = request.app[SERVICES]
        if services.ocr is None:
            raise RequestError(ErrorCode.UNSUPPORTED, "no OCR model is loaded (--ocr-model none)")
        upload = form.get("image")
        if upload is None or not hasattr(upload, "file"):
            raise protocol.bad_request("missing file field 'image'")
        mode = str(form.get("mode") or "format").lower()
        check_mode(services.ocr, mode)
        prompt = str(form.get("prompt") or "") or None
        if prompt is not None and len(prompt) > protocol.MAX_PROMPT_CHARS:
            raise protocol.bad_request(
                f"field 'prompt' must be at most {protocol.MAX_PROMPT_CHARS} characters"
            )
        max_tokens = _form_int(form, "max_tokens")
        stream = _form_bool(form, "stream")
        options = OcrOptions(
            mode=mode,
            max_tokens=max_tokens,
            prompt=prompt,
            ignore_eos=_form_bool(form, "ignore_eos"),
        )
        generate = services.ocr.generate(upload.file.read(), options)
        async with contextlib.aclosing(generate) as events:  # closing aborts the sequence
            if stream:
                return await _sse(request, events)
            text, _ = await read_text(events)
        return web.json_response({"result": text})

    return await _admitted(request, "ocr", serve)


async def parse(request: web.Request) -> web.StreamResponse:
    """``POST /parse``: multipart ``file`` (a PDF or an image) and the fields of a WebSocket
    ``parse`` request (``pages`` as ``0,2,5``, ``text``, ``chunk_chars``, ``scale``,
    ``figures``, ``furniture``).

    Answers one JSON object ``{"pages": [...], "markdown", "chunks", "timing", ...}``, or with
    ``stream=true`` newline-delimited JSON: a ``page`` object as each page completes, then the
    ``done`` object. Figure crops, when asked for, are base64 strings. A client that
    disconnects cancels the rest of the work.
    """

    async def serve(form: dict[str, Any]) -> web.StreamResponse:
        services = request.app[SERVICES]
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            raise protocol.bad_request("missing file field 'file' (a PDF or an image)")
        data = upload.file.read()
        fields: dict[str, Any] = {"pdf" if data[:5] == b"%PDF-" else "image": data}
        for name in ("text", "pages", "chunk_chars", "scale", "figures", "furniture"):
            raw = form.get(name)
            if raw not in (None, ""):
                fields[name] = _form_value(name, str(raw))
        document, options = protocol.parse_fields(fields, services.limits)
        started = time.monotonic()
        results = services.parse.parse(document, options)
        async with contextlib.aclosing(results):  # closing cancels the remaining pages
            if _form_bool(form, "stream"):
                return await _ndjson(request, results, started)
            pages: list[dict[str, Any]] = []
            async for result in results:
                if isinstance(result, ParsedDocument):
                    body = frames.parse_done_frame("http", result, started)
                    for key in ("type", "id", "finish_reason", "pages"):
                        body.pop(key)  # "pages" is the list of pages here, not their count
                    pages.sort(key=lambda p: p["page"])
                    return web.json_response({"pages": pages, **_jsonable(body)})
                pages.append(_jsonable(frames.parsed_page_fields(result)))
        raise RuntimeError("the parse pipeline ended without a result")

    return await _admitted(request, "parse", serve)


async def _ndjson(
    request: web.Request,
    results: AsyncIterator[ParsedPage | ParsedDocument],
    started: float,
) -> web.StreamResponse:
    # The first page is awaited before the headers go out, so that a bad document still gets
    # a 4xx status rather than a 200 stream that ends at once.
    first = await anext(results)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    result: ParsedPage | ParsedDocument | None = first
    while result is not None:
        if isinstance(result, ParsedDocument):
            line = frames.parse_done_frame("http", result, started)
        else:
            line = frames.parsed_page_frame("http", result)
        await response.write(json.dumps(_jsonable(line), ensure_ascii=False).encode() + b"\n")
        result = await anext(results, None)
    await response.write_eof()
    return response


def _jsonable(value: Any) -> Any:
    """Frames carry bytes (figure crops) that JSON cannot: base64 them."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _form_value(name: str, raw: str) -> Any:
    """A form field as the type the WebSocket frame would carry; validation is the frame's."""
    try:
        if name == "pages":
            return [int(p) for p in raw.replace(" ", "").split(",") if p]
        if name == "chunk_chars":
            return int(raw)
        if name == "scale":
            return float(raw)
    except ValueError:
        raise protocol.bad_request(f"field {name!r} is malformed: {protocol.shown(raw)}") from None
    if name in ("figures", "furniture"):
        return truthy(raw)
    return raw


async def _sse(request: web.Request, events: AsyncIterator[TokenEvent]) -> web.StreamResponse:
    # The first event is awaited before the headers go out, so that a bad image still gets a
    # 400 rather than a 200 stream that ends at once.
    first = await anext(events)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    event: TokenEvent | None = first
    while event is not None:
        if event.text:
            # The seed's field is "token"; line OCR adds where the line is, and its confidence.
            payload = {"token": event.text, **frames.token_fields(event)}
            del payload["text"]
            data = json.dumps(payload, ensure_ascii=False)
            await response.write(f"data: {data}\n\n".encode())
        if event.finish_reason is not None:
            done = {"finish_reason": event.finish_reason.value, "usage": frames.usage(event)}
            if event.error is not None:
                done["error"] = event.error
            await response.write(f"event: done\ndata: {json.dumps(done)}\n\n".encode())
            break
        event = await anext(events, None)
    await response.write_eof()
    return response


def _form_bool(form: dict[str, Any], name: str) -> bool:
    return truthy(form.get(name, "false"))


def _form_int(form: dict[str, Any], name: str) -> int | None:
    raw = form.get(name)
    if raw is None or raw == "":
        return
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise protocol.bad_request(
            f"field {name!r} must be an integer, got {protocol.shown(raw)}"
        ) from None
    if value < 1:
        raise protocol.bad_request(f"field {name!r} must be ≥ 1, got {value}")
    return value
