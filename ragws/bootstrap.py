"""The application built from its settings: models loaded, services started, routes added.

Each service has its own aiohttp clean-up context, started in order and stopped in reverse
(the OCR backend before the layout service, both before the document workers and the
preprocess pool they share), and
its own typed key on the application. The last context gathers them into the
:class:`~ragws.serving.services.Services` that sessions and handlers read. Also here: the
process's run loop (:func:`serve_forever`), used by ``ragws serve``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from ragws import __version__
from ragws.config import HUB_ID, OCR_HUB_MODELS, Settings, truthy
from ragws.engine.runner import StepRunner
from ragws.metrics import Metrics
from ragws.models import LayoutModel, load_layout_model, load_ocr_runner
from ragws.models.orientation import OrientationModel
from ragws.models.ppocr import PpOcrModels
from ragws.models.table_structure import TableStructureModel
from ragws.pipeline.document_service import DocumentService
from ragws.pipeline.layout import LayoutService
from ragws.pipeline.ocr.backend import OcrBackend
from ragws.pipeline.ocr.lines import LineOcrService
from ragws.pipeline.ocr.vlm import OcrService
from ragws.pipeline.parse import ParseService
from ragws.pipeline.table_service import OrientationService, TableStructureService
from ragws.runtime.tasks import in_pool
from ragws.runtime.threads import single_openmp_thread
from ragws.serving import frames, protocol, readiness
from ragws.serving.admission import Admission
from ragws.serving.app import add_routes
from ragws.serving.receive import ReceiveBudget
from ragws.serving.security import parse_hosts, security_middleware
from ragws.serving.services import SERVICES, SETTINGS, Services

log = logging.getLogger(__name__)
T = TypeVar("T")

METRICS = web.AppKey("metrics", Metrics)
PREPROCESS_POOL = web.AppKey("preprocess_pool", ThreadPoolExecutor)
DOCUMENTS = web.AppKey("documents", DocumentService)
LAYOUT = web.AppKey("layout", LayoutService)
OCR = web.AppKey("ocr", OcrBackend)  # holds None under --ocr-model none
TABLE_STRUCTURE = web.AppKey("table_structure", TableStructureService)
ORIENTATION = web.AppKey("orientation", OrientationService)

OcrModel = StepRunner | PpOcrModels


def create_app(
    settings: Settings,
    *,
    layout_model: LayoutModel | None = None,
    ocr_runner: OcrModel | None = None,
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
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend(
        [
            _preflight(layout_model is None, ocr_runner is None),
            _preprocess_pool,
            _document_service,
            _layout_service(layout_model),
            _ocr_service(ocr_runner),
            _table_structure_service,
            _orientation_service,
            _services,
        ]
    )
    add_routes(app)
    return app


# --- one clean-up context per service --------------------------------------------------------


def _preflight(
    load_layout: bool, load_ocr: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Before anything loads: every model the settings name has the packages its backend
    needs and can be had from the hub (or its cache), so a setting that cannot work fails in
    seconds, not after the other models have loaded."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        checks = []
        if load_layout:
            checks.append(("layout_model", settings.layout_model, _layout_extra(settings)))
        if load_ocr and settings.ocr_model not in ("embedded", "none"):
            checks.append(("ocr_model", settings.ocr_model, "got"))
        for setting, spec, extra in checks:
            await in_pool(None, _check_model, setting, spec, extra)
        yield

    return ctx


def _layout_extra(settings: Settings) -> str | None:
    return "yolo" if settings.layout_model.endswith(("doclayout-yolo", ".pt")) else None


async def _preprocess_pool(app: web.Application) -> AsyncIterator[None]:
    # One pool preprocesses for every service, so their threads never add up to more than
    # the cores the setting grants (clients' files are decoded in the document workers,
    # processes of their own).
    settings = app[SETTINGS]
    pool = ThreadPoolExecutor(
        settings.preprocess_threads or os.cpu_count() or 2, thread_name_prefix="ragws-prep"
    )
    app[PREPROCESS_POOL] = pool
    try:
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


async def _document_service(app: web.Application) -> AsyncIterator[None]:
    documents = DocumentService(app[SETTINGS], app[METRICS])
    await documents.start()
    app[DOCUMENTS] = documents
    try:
        yield
    finally:
        await documents.stop()


def _layout_service(
    layout_model: LayoutModel | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        model = layout_model or await in_pool(
            None,
            _load_model,
            "layout_model",
            settings.layout_model,
            _layout_extra(settings),
            lambda: load_layout_model(
                settings.layout_model, settings.device, settings.inference_threads
            ),
        )
        layout = LayoutService(model, settings, app[METRICS], app[PREPROCESS_POOL], app[DOCUMENTS])
        if settings.preferred_batch_size is None:
            log.info(
                "measuring the layout model's fastest batch size on this machine "
                "(layout_preferred_batch_size=auto; a few seconds)…"
            )
        await layout.start()
        app[LAYOUT] = layout
        try:
            yield
        finally:
            await layout.stop()

    return ctx


def _ocr_service(ocr_runner: OcrModel | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        runner = ocr_runner
        if runner is None and settings.ocr_model == "embedded":
            runner = await in_pool(
                None,
                lambda: PpOcrModels(
                    threads=settings.inference_threads, det_max_side=settings.ocr_det_max_side
                ),
            )
        elif runner is None and settings.ocr_model != "none":
            runner = await in_pool(
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
        service: OcrBackend | None = None
        shared = (runner, settings, app[METRICS], app[PREPROCESS_POOL], app[DOCUMENTS])
        if isinstance(runner, PpOcrModels):
            service = LineOcrService(*shared)
        elif runner is not None:
            service = OcrService(*shared)
        if service is not None:
            await service.start()
        app[OCR] = service
        try:
            yield
        finally:
            if service is not None:
                await service.stop()

    return ctx


# The page models of the parse pipeline: table structure for tables without a text layer, and
# page orientation for scans. Both ship inside their wheels.


async def _table_structure_service(app: web.Application) -> AsyncIterator[None]:
    threads = app[SETTINGS].inference_threads
    model = await in_pool(None, lambda: TableStructureModel(threads=threads))
    service = TableStructureService(model, app[PREPROCESS_POOL], **_page_model_queue(app))
    await service.start()
    app[TABLE_STRUCTURE] = service
    try:
        yield
    finally:
        await service.stop()


async def _orientation_service(app: web.Application) -> AsyncIterator[None]:
    threads = app[SETTINGS].inference_threads
    model = await in_pool(None, lambda: OrientationModel(threads=threads))
    service = OrientationService(model, app[PREPROCESS_POOL], **_page_model_queue(app))
    await service.start()
    app[ORIENTATION] = service
    try:
        yield
    finally:
        await service.stop()


def _page_model_queue(app: web.Application) -> dict[str, float | int]:
    settings = app[SETTINGS]
    return dict(
        max_queue_delay_s=settings.max_wait_ms / 1000,
        max_queue_size=settings.max_concurrent * 64,
    )


async def _services(app: web.Application) -> AsyncIterator[None]:
    """What sessions and handlers read, gathered from the services started before."""
    settings, metrics = app[SETTINGS], app[METRICS]
    layout, ocr = app[LAYOUT], app[OCR]
    services = Services(
        settings=settings,
        metrics=metrics,
        admission=Admission(
            settings.max_concurrent, metrics.inflight_requests, metrics.rejected_total
        ),
        layout=layout,
        ocr=ocr,
        documents=app[DOCUMENTS],
        parse=ParseService(
            app[DOCUMENTS],
            layout,
            ocr,
            metrics,
            app[PREPROCESS_POOL],
            pages_in_flight=settings.parse_pages_in_flight,
            tables=app[TABLE_STRUCTURE],
            orientation=app[ORIENTATION],
        ),
        hello=frames.hello_frame(
            {"layout": layout.model.name, "ocr": ocr.name if ocr else None},
            settings.public_limits(),
            ocr_modes=ocr.modes if ocr else (),
            ocr_markup=ocr.markup if ocr else False,
            ocr_architecture=ocr.architecture if ocr else None,
            ocr_page_mode=ocr.page_mode if ocr else None,
        ),
        limits=protocol.Limits(max_render_scale=settings.max_render_scale),
        receive=ReceiveBudget(settings.max_receive_buffer_mb * 2**20),
    )
    sessions, receive = services.sessions, services.receive
    metrics.websocket_send_queue_bytes.set_function(
        lambda: sum(session.queued_bytes() for session in sessions)
    )
    metrics.receive_buffer_bytes.set_function(lambda: receive.held)
    app[SERVICES] = services
    yield


# --- loading models ----------------------------------------------------------------------------


#: What each optional extra installs that its backends import.
EXTRA_MODULES = {"got": ("torch", "transformers"), "yolo": ("torch", "doclayout_yolo")}


def _load_model(setting: str, spec: str, extra: str | None, load: Callable[[], T]) -> T:
    """Run a model loader; a package the backend needs (an optional extra) that is missing is
    named with the extra that installs it."""
    try:
        for module in EXTRA_MODULES.get(extra or "", ()):
            importlib.import_module(module)
        # Loading runs once, on a pool thread that lives on: it must not keep an OpenMP team
        # of its own beside the engine's (ragws.runtime.threads).
        single_openmp_thread()
        return load()
    except ImportError as exc:
        if extra is None or (exc.name or "").partition(".")[0] == "ragws":
            raise  # not a missing extra: a fault of ragws's own
        raise RuntimeError(
            f"{setting}={spec}: this backend needs {exc.name or 'a package'}, which is not "
            f"installed; install it with: pip install 'ragws[{extra}]'"
        ) from exc


def _check_model(setting: str, spec: str, extra: str | None) -> None:
    """The packages a model's backend needs are installed, and a model from the Hugging Face
    hub can be had (:func:`_from_hub_or_cache`)."""
    _load_model(setting, spec, extra, lambda: _from_hub_or_cache(spec))


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


def _hub_model(spec: str) -> tuple[str, str, str] | None:
    """(repo, a file it has, the fix when it cannot be had) for a setting that names a hub
    model: a known name, or an ``owner/name`` id that is not a local path."""
    if spec in HUB_MODELS:
        return HUB_MODELS[spec]
    repo = OCR_HUB_MODELS.get(spec)
    if repo is None and HUB_ID.fullmatch(spec) and not Path(spec).expanduser().exists():
        repo = spec
    if repo is None:
        return None
    fix = (
        f"download it where the hub is reachable (huggingface-cli download {repo} "
        "--local-dir DIR) and pass --ocr-model DIR"
    )
    return repo, "config.json", fix


def _from_hub_or_cache(spec: str) -> None:
    """Before a model is loaded from the Hugging Face hub: when the hub cannot be reached,
    load it from the local cache offline, or fail at once with one message if it is not
    there. (huggingface_hub would retry for half a minute, logging every retry twice.)"""
    offline = truthy(os.environ.get("HF_HUB_OFFLINE", ""))
    hub = None if offline else _hub_model(spec)
    if hub is None:
        return
    repo, filename, fix = hub
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


# --- the process -----------------------------------------------------------------------------


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
