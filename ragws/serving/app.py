"""The aiohttp application: routes, thin handlers, start-up and clean-up.

Handlers parse, check admission, hand off to a service and shape the answer. They never touch
model frameworks; everything slow runs on the services' threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from ragws import __version__
from ragws.config import Settings
from ragws.engine.engine import StepRunner
from ragws.engine.sequence import TokenEvent
from ragws.metrics import CONTENT_TYPE, Metrics
from ragws.models import LayoutModel, load_layout_model, load_ocr_runner
from ragws.models.orientation import OrientationModel
from ragws.models.ppocr import PpOcrModels
from ragws.models.table_structure import TableStructureModel
from ragws.pipeline.layout import LayoutService, PageLayout
from ragws.pipeline.ocr.lines import LineOcrService
from ragws.pipeline.ocr.vlm import OcrBackend, OcrOptions, OcrService
from ragws.pipeline.parse import ParsedDocument, ParsedPage, ParseService
from ragws.pipeline.table_service import OrientationService, TableStructureService
from ragws.runtime.deadlines import MAX_DEADLINE_MS, DeadlineExceeded, deadline_scope
from ragws.runtime.fairness import client_scope, connection_key
from ragws.serving import openai_api, protocol, readiness
from ragws.serving.admission import Admission
from ragws.serving.protocol import ErrorCode, RequestError
from ragws.serving.receive import (
    SMALL_MESSAGE_BYTES,
    BoundedWebSocketResponse,
    ReceiveBudget,
    schedule_trim,
)
from ragws.serving.security import parse_hosts, security_middleware
from ragws.serving.session import Services, Session, parse_done_frame

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICES = web.AppKey("services", Services)
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
        Path(__file__).resolve().parent.parent / "static",
        Path(sys.prefix) / "share" / "ragws" / "static",
    ):
        if (candidate / "index.html").is_file():
            return candidate
    return None


def create_app(
    settings: Settings,
    *,
    layout_model: LayoutModel | None = None,
    ocr_runner: StepRunner | PpOcrModels | None = None,
) -> web.Application:
    """Build the application. The model arguments let an embedding program (or a test suite)
    share models that are already loaded; otherwise the settings name what to load."""
    allowed_hosts = parse_hosts(settings.allowed_hosts, settings.host)
    app = web.Application(
        client_max_size=settings.max_pdf_bytes + 1024 * 1024,
        middlewares=[
            security_middleware(settings.api_key, settings.allowed_origins, allowed_hosts)
        ],
    )
    app.cleanup_ctx.append(_services_ctx(settings, layout_model, ocr_runner))
    readiness.install(app, settings, SERVICES)  # GET /ready, refusals while draining, gauges
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
    return app


#: What each optional extra installs that its backends import.
EXTRA_MODULES = {"got": ("torch", "transformers"), "yolo": ("torch", "doclayout_yolo")}


def _load_model(setting: str, spec: str, extra: str | None, load: Callable[[], T]) -> T:
    """Run a model loader, failing early and clearly: a package the backend needs (an
    optional extra) is named with the extra that installs it, and a model from the Hugging
    Face hub that cannot be had says so in seconds (:func:`_from_hub_or_cache`)."""
    try:
        for module in EXTRA_MODULES.get(extra or "", ()):
            importlib.import_module(module)
        _from_hub_or_cache(spec)
        return load()
    except ImportError as exc:
        if extra is None:
            raise
        raise RuntimeError(
            f"{setting}={spec}: this backend needs {exc.name or 'a package'}, which is not "
            f"installed; install it with: pip install 'ragws[{extra}]'"
        ) from exc


#: Models fetched from the Hugging Face hub: the setting's value → (repo, a file it has, the fix).
HUB_MODELS = {
    "got-ocr2": (
        "stepfun-ai/GOT-OCR-2.0-hf",
        "config.json",
        "download it where the hub is reachable (huggingface-cli download "
        "stepfun-ai/GOT-OCR-2.0-hf --local-dir DIR) and pass --ocr-model DIR",
    ),
    "doclayout-yolo": (
        "juliozhao/DocLayout-YOLO-DocStructBench",
        "doclayout_yolo_docstructbench_imgsz1024.pt",
        "download doclayout_yolo_docstructbench_imgsz1024.pt where the hub is reachable and "
        "pass its path as --layout-model",
    ),
}
#: How long the hub gets to answer before it counts as unreachable.
HUB_PROBE_S = 5.0


def _from_hub_or_cache(spec: str) -> None:
    """Before a model is loaded from the Hugging Face hub: when the hub cannot be reached,
    load it from the local cache offline, or fail at once with one message if it is not
    there. (huggingface_hub would retry for half a minute, logging every retry twice.)"""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if spec not in HUB_MODELS or offline:
        return
    repo, filename, fix = HUB_MODELS[spec]
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    probe = urllib.request.Request(f"{endpoint}/api/models/{repo}", method="HEAD")
    try:
        with urllib.request.urlopen(probe, timeout=HUB_PROBE_S):
            return
    except urllib.error.HTTPError:
        return  # it answered: the loader reports what it says
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
        reason = getattr(exc, "reason", None) or exc
    # Offline from here on, read by huggingface_hub when it is imported (and set on it if it
    # already is), so the loader goes to the cache without retrying the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants, try_to_load_from_cache

    constants.HF_HUB_OFFLINE = True
    if isinstance(try_to_load_from_cache(repo, filename), str):
        log.warning("the Hugging Face hub cannot be reached (%s): %s from the cache", reason, repo)
        return
    raise RuntimeError(
        f"{spec}: the Hugging Face hub ({endpoint}) cannot be reached ({reason}) and {repo} "
        f"is not in the local cache; {fix}"
    )


def _services_ctx(
    settings: Settings,
    layout_model: LayoutModel | None,
    ocr_runner: StepRunner | PpOcrModels | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        model = layout_model or await loop.run_in_executor(
            None,
            _load_model,
            "layout_model",
            settings.layout_model,
            "yolo" if settings.layout_model.endswith(("doclayout-yolo", ".pt")) else None,
            lambda: load_layout_model(
                settings.layout_model, settings.device, settings.inference_threads
            ),
        )
        runner = ocr_runner
        if runner is None and settings.ocr_model == "embedded":
            runner = await loop.run_in_executor(
                None,
                lambda: PpOcrModels(
                    threads=settings.inference_threads, det_max_side=settings.ocr_det_max_side
                ),
            )
        elif runner is None and settings.ocr_model != "none":
            runner = await loop.run_in_executor(
                None,
                _load_model,
                "ocr_model",
                settings.ocr_model,
                "got",
                lambda: load_ocr_runner(
                    settings.ocr_model,
                    settings.device,
                    num_slots=settings.ocr_batch_size,
                    max_model_len=settings.max_model_len,
                    vision_batch=settings.ocr_vision_batch,
                    kv_cache_mb=settings.ocr_kv_cache_mb,
                ),
            )
        metrics = Metrics()
        # One pool preprocesses for both services, so their threads never add up to more than
        # the cores the setting grants (clients' files are decoded in the layout service's
        # document workers, processes of their own).
        pool = ThreadPoolExecutor(
            settings.preprocess_threads or os.cpu_count() or 2, thread_name_prefix="ragws-prep"
        )
        layout = LayoutService(model, settings, metrics, pool)
        if settings.preferred_batch_size is None:
            log.info(
                "measuring the layout model's fastest batch size on this machine "
                "(layout_preferred_batch_size=auto; a few seconds)…"
            )
        await layout.start()
        ocr_service: OcrBackend | None = None
        if isinstance(runner, PpOcrModels):
            ocr_service = LineOcrService(runner, settings, metrics, pool, layout.documents)
        elif runner is not None:
            ocr_service = OcrService(runner, settings, metrics, pool, layout.documents)
        if ocr_service is not None:
            await ocr_service.start()
        # The page models of the parse pipeline: table structure for tables without a text
        # layer, and page orientation for scans. Both ship inside their wheels.
        loop = asyncio.get_running_loop()
        threads = settings.inference_threads
        page_models = dict(
            max_queue_delay_s=settings.max_wait_ms / 1000,
            max_queue_size=settings.max_concurrent * 64,
        )
        tables = TableStructureService(
            await loop.run_in_executor(None, lambda: TableStructureModel(threads=threads)),
            pool,
            **page_models,
        )
        orientation = OrientationService(
            await loop.run_in_executor(None, lambda: OrientationModel(threads=threads)),
            pool,
            **page_models,
        )
        await tables.start()
        await orientation.start()
        app[SERVICES] = Services(
            settings=settings,
            metrics=metrics,
            admission=Admission(
                settings.max_concurrent, metrics.inflight_requests, metrics.rejected_total
            ),
            layout=layout,
            ocr=ocr_service,
            parse=ParseService(
                layout,
                ocr_service,
                metrics,
                pool,
                max_image_pixels=settings.max_image_pixels,
                pages_in_flight=settings.parse_pages_in_flight,
                tables=tables,
                orientation=orientation,
            ),
            hello=protocol.hello_frame(
                {"layout": model.name, "ocr": ocr_service.name if ocr_service else None},
                settings.public_limits(),
                ocr_modes=ocr_service.modes if ocr_service else (),
                ocr_markup=ocr_service.markup if ocr_service else False,
            ),
            limits=protocol.Limits(max_render_scale=settings.max_render_scale),
            receive=ReceiveBudget(settings.max_receive_buffer_mb * 2**20),
        )
        sessions = app[SERVICES].sessions
        metrics.websocket_send_queue_bytes.set_function(
            lambda: sum(session.queued_bytes() for session in sessions)
        )
        receive = app[SERVICES].receive
        metrics.receive_buffer_bytes.set_function(lambda: receive.held)
        try:
            yield
        finally:
            if ocr_service is not None:
                await ocr_service.stop()
            await tables.stop()
            await orientation.stop()
            await layout.stop()
            pool.shutdown(wait=True, cancel_futures=True)

    return ctx


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
        ocr = {"model": services.ocr.name, "healthy": services.ocr.healthy}
        if isinstance(services.ocr, OcrService):
            runner = services.ocr.runner
            ocr["kv_slots"] = runner.num_slots
            ocr["max_model_len"] = runner.max_model_len
            ocr["kv_cache_mib"] = round(runner.kv_cache_bytes() / 2**20, 1)
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
            "document_workers": services.layout.documents.workers,
            "document_tasks_waiting": services.layout.documents.waiting(),
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
        plan = await layout.open_pdf(data, None)
        try:
            detected = layout.detect_pdf(plan, scale=(scale_x, scale_y), iou=iou, images=True)
            async with contextlib.aclosing(detected):  # a disconnect withdraws queued pages
                pages = [page async for page in detected]
        finally:
            await layout.close_pdf(plan)
        elapsed = time.monotonic() - started
        pages.sort(key=lambda p: p.page or 0)
        return web.json_response(
            {
                "result": [_seed_page(p) for p in pages],
                "stats": {
                    "total_page": len(pages),
                    "time_taken": elapsed,
                    "page_per_second": len(pages) / max(elapsed, 1e-9),
                },
            }
        )

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
        if mode not in protocol.OCR_MODES:
            raise protocol.bad_request("field 'mode' must be 'plain' or 'format'")
        max_tokens = _form_int(form, "max_tokens")
        stream = _form_bool(form, "stream")
        options = OcrOptions(
            mode=mode, max_tokens=max_tokens, ignore_eos=_form_bool(form, "ignore_eos")
        )
        generate = services.ocr.generate(upload.file.read(), options)
        async with contextlib.aclosing(generate) as events:  # closing aborts the sequence
            if stream:
                return await _sse(request, events)
            parts, last = [], None
            async for event in events:
                parts.append(event.text)
                last = event
        if last is not None and last.error is not None:
            raise RequestError(ErrorCode.INTERNAL, f"ocr model failed: {last.error}")
        return web.json_response({"result": "".join(parts)})

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
        frame: dict[str, Any] = {"type": "parse", "id": "http"}
        frame["pdf" if data[:5] == b"%PDF-" else "image"] = data
        for name in ("text", "pages", "chunk_chars", "scale", "figures", "furniture"):
            raw = form.get(name)
            if raw not in (None, ""):
                frame[name] = _form_value(name, str(raw))
        parse_request = protocol.parse_request(frame, services.limits)
        assert isinstance(parse_request, protocol.ParseRequest)
        started = time.monotonic()
        results = services.parse.parse(parse_request)
        async with contextlib.aclosing(results):  # closing cancels the remaining pages
            if _form_bool(form, "stream"):
                return await _ndjson(request, results, started)
            pages: list[dict[str, Any]] = []
            async for result in results:
                if isinstance(result, ParsedDocument):
                    body = parse_done_frame("http", result, started)
                    for key in ("type", "id", "finish_reason", "pages"):
                        body.pop(key)  # "pages" is the list of pages here, not their count
                    pages.sort(key=lambda p: p["page"])
                    return web.json_response({"pages": pages, **_jsonable(body)})
                pages.append(_jsonable(_page_body(result.to_frame(None))))
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
            line = parse_done_frame("http", result, started)
        else:
            line = result.to_frame("http")
        await response.write(json.dumps(_jsonable(line), ensure_ascii=False).encode() + b"\n")
        result = await anext(results, None)
    await response.write_eof()
    return response


def _page_body(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k not in ("type", "id")}


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
        return raw.lower() in ("1", "true", "yes", "on")
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
            payload: dict[str, Any] = {"token": event.text}
            if event.box is not None:  # line OCR: where the line is, and its confidence
                payload["box"] = [round(v, 2) for v in event.box]
                payload["score"] = round(event.score or 0.0, 4)
            data = json.dumps(payload, ensure_ascii=False)
            await response.write(f"data: {data}\n\n".encode())
        if event.finish_reason is not None:
            done = {
                "finish_reason": event.finish_reason.value,
                "usage": {
                    "prompt_tokens": event.prompt_tokens,
                    "completion_tokens": event.completion_tokens,
                },
            }
            if event.error is not None:
                done["error"] = event.error
            await response.write(f"event: done\ndata: {json.dumps(done)}\n\n".encode())
            break
        event = await anext(events, None)
    await response.write_eof()
    return response


def _form_bool(form: dict[str, Any], name: str) -> bool:
    return str(form.get(name, "false")).lower() in ("1", "true", "yes", "on")


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


def _seed_page(page: PageLayout) -> dict[str, Any]:
    """One page in the seed's shape: regions sorted top-down, integer pixel corners."""
    det = page.detections
    order = sorted(range(len(det)), key=lambda i: (float(det.boxes[i][1]), float(det.boxes[i][0])))
    return {
        "classes": [det.labels[i] for i in order],
        "coordinates": [
            dict(
                zip(
                    ("x_min", "y_min", "x_max", "y_max"),
                    (int(v) for v in det.boxes[i]),
                    strict=False,
                )
            )
            for i in order
        ],
        "scores": [round(float(det.scores[i]), 4) for i in order],
        "img": base64.b64encode(page.jpeg or b"").decode("ascii"),
    }


def _url(site: web.TCPSite, settings: Settings) -> str:
    """The address clients use: the bound port (when 0 was asked), a loopback name for a
    wildcard bind."""
    port = settings.port
    server = site._server  # the listening sockets: the only place the bound port is known
    sockets = getattr(server, "sockets", None) or ()
    if sockets:
        port = sockets[0].getsockname()[1]
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def serve_forever(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully (used by ``ragws serve``).

    The port answers from the start (503 "starting" while the models load). Shutdown is
    :func:`ragws.serving.readiness.drain`: ``/ready`` 503 and ``goaway`` first, then refusals (503,
    ``overloaded`` on open sockets) with the listener still open, running requests given
    ``shutdown_grace_s``, sockets closed with 1001; then the models are released.
    """
    if parse_hosts(settings.allowed_hosts, settings.host) is None and not settings.allowed_hosts:
        log.warning(
            "bound to %s with no allowed_hosts: requests for any Host name are answered, so a "
            "page whose name is re-resolved to this address (DNS rebinding) can use the "
            "server; set --allowed-hosts to the names clients use",
            settings.host,
        )
    log.info("ragws %s: loading models…", __version__)
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, access_log=None)
    # Bound first, so that the port answers 503 "starting" while the models load.
    sockets = readiness.bind(settings.host, settings.port)
    try:
        async with readiness.answering_while_starting(sockets):
            await runner.setup()  # loads the models; a bad model fails here
            sites = [web.SockSite(runner, sock) for sock in sockets]
            for site in sites:
                await site.start()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    log.info("ready on %s (WebSocket at /ws, viewer at /)", _url(sites[0], settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        app = runner.app
        await readiness.drain(app[readiness.READINESS], app[SERVICES], settings)
    finally:
        await runner.cleanup()
    log.info("stopped")
