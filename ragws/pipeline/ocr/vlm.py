"""OCR service: image bytes in, an async stream of text deltas out.

The event-loop half of the OCR engine. It decodes and prepares the image on the worker pool,
hands a :class:`~ragws.engine.sequence.Sequence` to the engine thread, and relays the engine's
events through an asyncio queue. Cancellation is structural: when the consuming task is cancelled (a
``cancel`` frame, a closed socket, a disconnected HTTP client) the ``finally`` below aborts the
sequence, and the engine frees its KV slot before its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ragws.config import Settings
from ragws.engine.engine import OcrEngine, StepRunner
from ragws.engine.sequence import Sampling, Sequence, TokenEvent
from ragws.metrics import Metrics
from ragws.runtime import deadlines
from ragws.serving.protocol import ErrorCode, RequestError, bad_request, too_large

if TYPE_CHECKING:
    from ragws.pipeline.document_pool import DocumentPool

_request_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class OcrOptions:
    mode: str = "format"  # "format" or "plain", as GOT's prompts
    max_tokens: int | None = None  # None: the server's cap
    box: tuple[float, float, float, float] | None = None  # crop to this region first
    crop: bool = False  # GOT's multi-patch mode for large, dense pages
    ignore_eos: bool = False
    prompt: str | None = None  # the request's own instruction; None: the model's for ``mode``
    system: str | None = None  # a system message; None: the model's own
    sampling: Sampling | None = None  # None: greedy
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    skip_special_tokens: bool = True


class OcrBackend(Protocol):
    """What the session, the HTTP handlers and the parse pipeline need of an OCR backend.

    Implemented by :class:`OcrService` (GOT-OCR2, token streams from the continuous-batching
    engine) and :class:`~ragws.pipeline.ocr.lines.LineOcrService` (PP-OCR, one event per text line).
    """

    modes: tuple[str, ...]  # accepted ``mode`` values
    markup: bool  # whether ``mode="format"`` yields markup (LaTeX, markdown tables)

    @property
    def name(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    def queue_depths(self) -> dict[str, int]:
        """Work waiting for a model, by the name of what waits (``ragws_queue_depth``)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(
        self, image: bytes | np.ndarray, options: OcrOptions
    ) -> AsyncIterator[TokenEvent]: ...

    async def read_regions(
        self,
        rgb: np.ndarray,
        regions: Seq[tuple[float, float, float, float]],
        modes: Seq[str],
    ) -> list[str]: ...

    async def read_page_lines(
        self, rgb: np.ndarray
    ) -> list[tuple[str, tuple[float, float, float, float]]] | None:
        """Every text line of a page with its box, or None for a backend that reads regions
        and cannot place lines (the parse pipeline then reads region by region)."""
        ...


class OcrService:
    """GOT-OCR2 behind the continuous-batching engine (see the module docstring)."""

    modes: tuple[str, ...] = ("format", "plain")
    markup = True

    def __init__(
        self,
        runner: StepRunner,
        settings: Settings,
        metrics: Metrics,
        pool: ThreadPoolExecutor,
        documents: DocumentPool,
    ) -> None:
        """``pool`` builds prompts, ``documents`` decodes images; both shared with the layout
        service."""
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self.engine = OcrEngine(
            runner,
            max_prefill_tokens=settings.ocr_max_prefill_tokens,
            on_step=metrics.observe_ocr_step,
        )
        self._pool = pool
        self._documents = documents
        metrics.kv_slots_total.set(runner.num_slots)

    @property
    def name(self) -> str:
        return self.runner.name  # type: ignore[attr-defined]

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    def queue_depths(self) -> dict[str, int]:
        """Sequences waiting for a KV slot (read off the engine thread: a momentary count)."""
        return {"ocr_sequences": len(self.engine.scheduler.waiting)}

    async def start(self) -> None:
        self.engine.start()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    async def generate(
        self, image: bytes | np.ndarray, options: OcrOptions
    ) -> AsyncIterator[TokenEvent]:
        """Yield text deltas as the engine decodes them; the last event has a finish reason.

        ``image`` is encoded bytes (decoded in a document worker) or an RGB array.
        """
        if not self.engine.healthy:
            raise RequestError(ErrorCode.UNAVAILABLE, "the OCR engine is not running")
        loop = asyncio.get_running_loop()
        rgb = image
        if isinstance(image, bytes):
            rgb = await self._documents.decode_image(image, self.settings.max_image_pixels)
        rgb = crop_box(rgb, options.box)
        try:
            prompt = await loop.run_in_executor(
                self._pool,
                lambda: self.runner.prepare(
                    rgb,
                    mode=options.mode,
                    crop=options.crop,
                    prompt=options.prompt,
                    system=options.system,
                ),
            )
        except ValueError as exc:  # text the model's prompt cannot take
            raise bad_request(f"the prompt cannot be built: {exc}") from None
        room = self.runner.max_model_len - len(prompt.prompt_ids)
        if room < 1:
            raise too_large(
                f"the prompt is {len(prompt.prompt_ids)} tokens; max_model_len is "
                f"{self.runner.max_model_len}"
            )
        limit = self.settings.ocr_max_tokens  # a larger max_tokens is capped, as documented
        cap = min(options.max_tokens or limit, limit, room)
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        deadline = deadlines.current.get()
        seq = Sequence(
            request_id=next(_request_ids),
            prompt_ids=prompt.prompt_ids,
            image=prompt,
            max_tokens=cap,
            stop_ids=self.runner.stop_ids,
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            ignore_eos=options.ignore_eos,
            sampling=options.sampling,
            stop=options.stop,
            skip_special_tokens=options.skip_special_tokens,
            arrived_at=time.monotonic(),
            on_start=deadline.started_threadsafe if deadline is not None else None,
        )
        self.engine.submit(seq)
        finished = False
        try:
            while not finished:
                event = coalesce(await events.get(), events)
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.engine.abort(seq.request_id)

    async def read_page_lines(
        self, rgb: np.ndarray
    ) -> list[tuple[str, tuple[float, float, float, float]]] | None:
        """GOT-OCR2 reads regions, not located lines: None (see :class:`OcrBackend`)."""
        return None

    async def read_regions(
        self,
        rgb: np.ndarray,
        regions: Seq[tuple[float, float, float, float]],
        modes: Seq[str],
    ) -> list[str]:
        """The text of each region, every region its own sequence in the running batch."""

        async def one(box: tuple[float, float, float, float], mode: str) -> str:
            events = self.generate(rgb, OcrOptions(mode=mode, box=box))
            parts = []
            try:
                async for event in events:
                    if event.error is not None:
                        raise RuntimeError(f"ocr model failed: {event.error}")
                    parts.append(event.text)
            finally:
                await events.aclose()
            return "".join(parts)

        return list(await asyncio.gather(*(one(b, m) for b, m in zip(regions, modes, strict=True))))


def coalesce(event: TokenEvent, queue: asyncio.Queue[TokenEvent]) -> TokenEvent:
    """``event`` merged with the events queued behind it.

    The engine does not wait for readers: when a client reads slowly (and its socket's send
    queue is full) a sequence's deltas pile up here. They go out as one frame rather than one
    each, so a reader that falls behind catches up in fewer, larger frames, and no text is
    lost. The counters and timestamps are the latest event's.
    """
    while event.finish_reason is None and not queue.empty():
        later = queue.get_nowait()
        later.text = event.text + later.text
        event = later
    return event


def crop_box(rgb: np.ndarray, box: tuple[float, float, float, float] | None) -> np.ndarray:
    """Crop to ``[x0, y0, x1, y1]`` in the image's pixels; refuse boxes outside the image."""
    if box is None:
        return rgb
    x0, y0, x1, y1 = clamp_box(rgb, box)
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def clamp_box(rgb: np.ndarray, box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """``box`` rounded and clipped to the image: what :func:`crop_box` cuts, and so the
    origin of the crop's coordinates (a box may start left of or above the image)."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (round(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise bad_request(f"box {list(box)} leaves no pixels of the {width}×{height} image")
    return x0, y0, x1, y1
