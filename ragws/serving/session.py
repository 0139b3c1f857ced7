"""One WebSocket connection: many requests in flight, multiplexed by ``id``.

Each admitted request runs as its own task. ``cancel`` cancels that task and the socket closing
cancels all of them; cancellation propagates into whatever the task awaits (a batcher future,
a render), so withdrawn work never reaches the model. A request's ``deadline_ms`` cancels it
the same way if it is still queued then (:mod:`ragws.runtime.deadlines`).

Frames go out through the socket's bounded send queue (:mod:`ragws.serving.outbox`). When it is
full, a request that sends pauses where it is, and so only that socket's streams wait for a
slow reader: a token stream's text gathers and goes out merged, a document's next pages wait
for the window its sent pages free. A client that stops reading for ``send_stall_timeout_s``
is closed with 1008 and its requests are cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from ragws.engine.sequence import TokenEvent
from ragws.errors import ErrorCode, RequestError, RequestId
from ragws.pipeline.ocr.backend import OcrOptions, check_mode, read_text
from ragws.pipeline.parse import ParsedDocument
from ragws.runtime import fairness
from ragws.runtime.deadlines import DeadlineExceeded, deadline_scope
from ragws.runtime.tasks import cancel_all
from ragws.serving import frames, protocol
from ragws.serving.outbox import Outbox
from ragws.serving.outcome import request_ended
from ragws.serving.protocol import (
    CancelRequest,
    LayoutRequest,
    OcrRequest,
    ParseRequest,
    PdfRequest,
    Request,
)
from ragws.serving.services import Services

log = logging.getLogger(__name__)

_CLOSING = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)

#: How many ended request ids a session remembers to ignore late cancels for.
RECENTLY_ENDED = 1024
#: How long a closing socket's client gets to read up to the close frame before the
#: connection is cut, so that a client that stopped reading cannot hold its buffers.
CLOSE_GRACE_S = 10.0


class Session:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        services: Services,
        peer: str,
        transport: asyncio.Transport | None = None,
    ) -> None:
        """``transport`` is the connection under ``ws``: what it buffers counts as queued for
        the client, and a client that stops reading is cut off through it."""
        self.ws = ws
        self.services = services
        self.peer = peer
        self.transport = transport
        self.stalled = False  # closed with 1008: the client stopped reading
        self.inflight: dict[RequestId, asyncio.Task[None]] = {}
        self._started: set[asyncio.Task[None]] = set()  # request tasks that began running
        self.shutting_down = False
        self.task: asyncio.Task[None] | None = None  # the one running run()
        self._background: set[asyncio.Future[None]] = set()  # sends of the done callbacks
        # Ids of requests that ended lately, so that a cancel which crossed the end is ignored
        # rather than answered with an error about an unknown id.
        self._recently_ended: collections.OrderedDict[RequestId, None] = collections.OrderedDict()
        settings = services.settings
        self.outbox = Outbox(
            ws,
            limit=settings.send_queue_bytes,
            stall_timeout_s=settings.send_stall_timeout_s,
            on_stall=self._on_stall,
        )
        self._handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            LayoutRequest: self._layout,
            PdfRequest: self._pdf,
            OcrRequest: self._ocr,
            ParseRequest: self._parse,
        }

    async def run(self) -> None:
        """Serve the socket until it closes, then cancel whatever is still in flight."""
        self.task = asyncio.current_task()
        # The socket is one client of the shared queues; every request task inherits this.
        fairness.current.set(fairness.connection_key("ws", self.peer))
        metrics = self.services.metrics
        metrics.websocket_connections.inc()
        self.services.sessions.add(self)
        try:
            await self.send(self.services.hello)
            while True:
                message = await self._next_message()
                if message is None or message.type in _CLOSING:
                    break
                if message.type == WSMsgType.BINARY:
                    await self._on_frame(message.data)
                elif message.type == WSMsgType.TEXT:
                    await self.send_error(
                        None,
                        RequestError(
                            ErrorCode.BAD_REQUEST,
                            "text frames are not accepted: send one msgpack map per binary frame",
                        ),
                    )
                elif message.type == WSMsgType.ERROR:
                    log.info("socket %s: %s", self.peer, self.ws.exception())
                    break
        finally:
            self.services.sessions.discard(self)
            metrics.websocket_connections.dec()
            tasks = list(self.inflight.values())
            for task in tasks:
                task.cancel()
            # Before any await: when the client drops, this task is cancelled again while it
            # waits below, and nothing after that await would run (a writer task left
            # pending, destroyed with the session).
            self.outbox.close()
            await asyncio.gather(*tasks, self.outbox.stop(), return_exceptions=True)

    async def _next_message(self) -> WSMessage | None:
        """The next message, or None once the socket has idled out: nothing in flight and no
        frame for ``idle_timeout_s`` (a request in flight keeps the socket open)."""
        idle = self.services.settings.idle_timeout_s or None
        while True:
            try:
                return await self.ws.receive(timeout=idle)
            except asyncio.TimeoutError:
                if not self.inflight:
                    log.info("socket %s: idle for %.0f s, closing", self.peer, idle)
                    await self.close(WSCloseCode.OK, "idle timeout")
                    return None

    async def shutdown(self) -> None:
        """End what is still in flight with ``finish_reason: "shutdown"``, then close the
        socket with 1001 (going away)."""
        self.shutting_down = True
        await cancel_all(list(self.inflight.values()))
        await self.close(WSCloseCode.GOING_AWAY, "server shutting down")

    async def close(self, code: WSCloseCode, reason: str) -> None:
        """Close with ``code`` once the frames already queued are written (not for a client
        that stopped reading). The close frame goes behind what the client has not read yet;
        whatever it has not read :data:`CLOSE_GRACE_S` from now is dropped with the
        connection."""
        loop = asyncio.get_running_loop()
        if self.transport is not None:
            loop.call_later(CLOSE_GRACE_S, self.transport.abort)  # no-op if closed by then
        deadline = loop.time() + CLOSE_GRACE_S
        try:
            if not self.stalled:
                await self.outbox.flush(CLOSE_GRACE_S)
            # No drain: the writer may be the one waiting for this client to read.
            closing = self.ws.close(code=code, message=reason.encode(), drain=False)
            await asyncio.wait_for(closing, max(0.0, deadline - loop.time()))
        except (asyncio.TimeoutError, ConnectionError):
            pass

    def queued_bytes(self) -> int:
        """Bytes for this client that it has not read yet: the send queue's, and those
        already in the connection's buffer."""
        transport = self.transport
        buffered = 0
        if transport is not None and not transport.is_closing():
            buffered = transport.get_write_buffer_size()
        return self.outbox.queued_bytes + buffered

    def _on_stall(self) -> None:
        """A send has waited ``send_stall_timeout_s`` for the client to read: cut it off."""
        if self.stalled or self.ws.closed:
            return
        self.stalled = True
        timeout = self.services.settings.send_stall_timeout_s
        log.warning(
            "socket %s: client read nothing for %.0f s with its send queue full; closing (1008)",
            self.peer,
            timeout,
        )
        self.services.metrics.websocket_stalls_total.inc()
        self.outbox.discard()  # frames it will never read
        for task in list(self.inflight.values()):
            task.cancel()
        closing = asyncio.ensure_future(
            self.close(WSCloseCode.POLICY_VIOLATION, "send queue full: the client stopped reading")
        )
        self._background.add(closing)
        closing.add_done_callback(self._background.discard)

    # --- inbound --------------------------------------------------------------------------

    async def _on_frame(self, data: bytes) -> None:
        frame: Any = None
        try:
            frame = protocol.decode_frame(data)
            request = protocol.parse_request(frame, self.services.limits)
        except RequestError as exc:
            if exc.request_id is None:
                exc.request_id = protocol.peek_id(frame)
            is_cancel = isinstance(frame, dict) and frame.get("type") == "cancel"
            await self._refuse(exc.request_id, exc, ended=not is_cancel)
            return
        except Exception as exc:
            # A frame this server cannot read is a bug here, never a reason to drop the
            # socket and the requests multiplexed on it.
            log.exception("socket %s: a frame could not be read", self.peer)
            message = f"the server failed to read this frame: {type(exc).__name__}"
            await self.send_error(None, RequestError(ErrorCode.INTERNAL, message))
            return
        if isinstance(request, CancelRequest):
            await self._cancel(request.id)
            return
        kind = _type_name(request)
        limit = self.services.settings.max_inflight_per_socket
        if len(self.inflight) >= limit:
            self.services.metrics.requests_total.labels(kind, "overloaded").inc()
            message = (
                f"this socket has {limit} requests in flight (max_inflight_per_socket); "
                "wait for one to end, or open another socket"
            )
            await self._refuse(request.id, RequestError(ErrorCode.OVERLOADED, message))
            return
        if request.id in self.inflight:
            await self.send_error(
                request.id,
                RequestError(ErrorCode.BAD_REQUEST, f"id {request.id!r} is already in flight"),
            )
            return
        admission = self.services.admission
        if not admission.try_acquire():
            self.services.metrics.requests_total.labels(kind, "overloaded").inc()
            error = RequestError(ErrorCode.OVERLOADED, admission.overloaded_message())
            await self._refuse(request.id, error)
            return
        task = asyncio.create_task(self._serve(request, kind), name=f"{self.peer}:{request.id}")
        self.inflight[request.id] = task
        task.add_done_callback(functools.partial(self._on_task_done, request.id, kind))

    async def _refuse(
        self, request_id: RequestId | None, exc: RequestError, *, ended: bool = True
    ) -> None:
        """Answer a frame that starts no request with ``exc``. A refused request's id then
        counts as ended, so that a cancel the client sent before it saw the refusal is ignored
        like any cancel that crosses an end (``ended`` False: the frame was itself a cancel)."""
        if ended and request_id is not None and request_id not in self.inflight:
            self._remember_ended(request_id)
        await self.send_error(request_id, exc)

    async def _cancel(self, request_id: RequestId) -> None:
        task = self.inflight.get(request_id)
        if task is None and request_id in self._recently_ended:
            return  # the cancel crossed the request's end on the wire: nothing left to stop
        if task is None:
            await self.send_error(
                request_id,
                RequestError(
                    ErrorCode.BAD_REQUEST, f"no request with id {request_id!r} is in flight"
                ),
            )
            return
        task.cancel()

    def _on_task_done(self, request_id: RequestId, kind: str, task: asyncio.Task[None]) -> None:
        """Runs once per admitted request, even for a task cancelled before it ever ran (a
        cancel frame or a closing socket right behind the request), whose own ``finally``
        never executes: the admission slot is returned here, and such a request still gets
        its ``done`` frame."""
        self.services.admission.release()
        if self.inflight.get(request_id) is task:
            del self.inflight[request_id]
            self._remember_ended(request_id)
        if task in self._started:
            self._started.discard(task)
            return
        reason = "shutdown" if self.shutting_down else "cancelled"
        self.services.metrics.requests_total.labels(kind, reason).inc()
        if not self.ws.closed:
            sending = asyncio.ensure_future(self.send(frames.done_frame(request_id, reason)))
            self._background.add(sending)
            sending.add_done_callback(self._background.discard)

    def _remember_ended(self, request_id: RequestId) -> None:
        self._recently_ended[request_id] = None
        self._recently_ended.move_to_end(request_id)
        if len(self._recently_ended) > RECENTLY_ENDED:
            self._recently_ended.popitem(last=False)

    async def _serve(self, request: Request, kind: str) -> None:
        self._started.add(asyncio.current_task())  # type: ignore[arg-type]
        started = time.monotonic()
        outcome = "ok"
        deadline_s = None if request.deadline_ms is None else request.deadline_ms / 1000
        try:
            with deadline_scope(deadline_s):
                await self._handlers[type(request)](request)
        except (asyncio.CancelledError, DeadlineExceeded) as exc:
            outcome = "timeout" if isinstance(exc, DeadlineExceeded) else "cancelled"
            outcome = "shutdown" if self.shutting_down else outcome
            if not self.ws.closed:  # a cancel, a deadline or shutdown: the request is over
                await self.send(frames.done_frame(request.id, outcome))
        except RequestError as exc:
            outcome = exc.code.value
            await self.send_error(request.id, exc)
        except Exception as exc:
            outcome = "internal"
            log.exception("request %s on %s failed", request.id, self.peer)
            await self.send_error(
                request.id, RequestError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            )
        finally:
            # Popped here, with no await between the last frame and this line, so a client
            # that reuses the id as soon as it sees the end never finds it still in flight.
            if self.inflight.get(request.id) is asyncio.current_task():
                del self.inflight[request.id]
                self._remember_ended(request.id)
            request_ended(
                log,
                self.services.metrics,
                kind=kind,
                request_id=request.id,
                peer=self.peer,
                outcome=outcome,
                started=started,
            )

    # --- request types --------------------------------------------------------------------

    async def _layout(self, request: LayoutRequest) -> None:
        result = await self.services.layout.detect_image(request.image, request.conf, request.iou)
        await self.send(frames.layout_frame(request.id, result))

    async def _pdf(self, request: PdfRequest) -> None:
        started = time.monotonic()
        layout = self.services.layout
        plan = await self.services.documents.open_pdf(request.pdf, request.pages)
        pages = layout.detect_pdf(
            plan, scale=request.scale, conf=request.conf, iou=request.iou, images=request.images
        )
        try:
            async for page in pages:
                await self.send(
                    frames.layout_page_frame(request.id, page, len(plan.pages), plan.doc.page_count)
                )
        finally:
            await pages.aclose()
            await self.services.documents.close_pdf(plan)
        await self.send(
            frames.pages_done_frame(request.id, len(plan.pages), plan.doc.page_count, started)
        )

    async def _ocr(self, request: OcrRequest) -> None:
        ocr = self.services.ocr
        if ocr is None:
            raise RequestError(
                ErrorCode.UNSUPPORTED,
                "this server has no ocr model (started with --ocr-model none)",
            )
        started = time.monotonic()
        check_mode(ocr, request.mode)
        options = OcrOptions(
            mode=request.mode,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            box=request.box,
            crop=request.crop,
            ignore_eos=request.ignore_eos,
        )

        async def stream(event: TokenEvent) -> None:
            if event.text:
                await self.send(frames.token_frame(request.id, event))

        text, last = await read_text(ocr.generate(request.image, options), stream)
        await self.send(frames.ocr_done_frame(request.id, text, last, started))

    async def _parse(self, request: ParseRequest) -> None:
        started = time.monotonic()
        results = self.services.parse.parse(request.document, request.options)
        async with contextlib.aclosing(results):  # closing cancels the remaining pages
            async for result in results:
                if isinstance(result, ParsedDocument):
                    await self.send(frames.parse_done_frame(request.id, result, started))
                else:
                    await self.send(frames.parsed_page_frame(request.id, result))

    # --- outbound -------------------------------------------------------------------------

    async def send(self, frame: dict[str, Any]) -> None:
        """Queue one frame; waits while the send queue is full (see the module docstring)."""
        if not self.ws.closed:
            await self.outbox.put(frames.encode(frame))

    async def send_error(self, request_id: RequestId | None, exc: RequestError) -> None:
        await self.send(frames.error_frame(request_id, exc.code, exc.message))


def _type_name(request: Request) -> str:
    names = {LayoutRequest: "layout", PdfRequest: "pdf", OcrRequest: "ocr", ParseRequest: "parse"}
    return names[type(request)]
