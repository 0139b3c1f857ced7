"""OCR service: image bytes in, an async stream of text deltas out.

The event-loop half of the OCR engine. It decodes the image in a document worker, has the
engine prepare it on the worker pool, submits the prepared request to the engine and relays the
engine's events through an asyncio queue; it never touches the model runner, which the engine
owns. Cancellation is structural: when the consuming task is cancelled (a ``cancel`` frame, a
closed socket, a disconnected HTTP client) the ``finally`` below aborts the sequence, and the
engine frees its KV slot before its next step.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ragws.config import Settings
from ragws.engine.engine import EngineLimits, OcrEngine, PromptTooLong
from ragws.engine.runner import StepRunner
from ragws.engine.sequence import GenerationParams, TokenEvent
from ragws.errors import ErrorCode, RequestError, bad_request, too_large
from ragws.metrics import Metrics
from ragws.pipeline.ocr.backend import OcrOptions, image_region
from ragws.runtime import deadlines
from ragws.runtime.tasks import in_pool

if TYPE_CHECKING:
    from ragws.pipeline.document_service import DocumentService


class OcrService:
    """GOT-OCR2 behind the continuous-batching engine (see the module docstring)."""

    def __init__(
        self,
        runner: StepRunner,
        settings: Settings,
        metrics: Metrics,
        pool: ThreadPoolExecutor,
        documents: DocumentService,
    ) -> None:
        """``runner`` goes to the engine, which owns it; ``pool`` builds prompts,
        ``documents`` decodes images, both shared with the layout service."""
        self.settings = settings
        self.metrics = metrics
        self.engine = OcrEngine(
            runner,
            max_prefill_tokens=settings.ocr_max_prefill_tokens,
            on_step=metrics.observe_ocr_step,
        )
        self._pool = pool
        self._documents = documents
        metrics.kv_slots_total.set(self.engine.limits.num_slots)

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def modes(self) -> tuple[str, ...]:
        return self.engine.tasks.modes

    @property
    def markup(self) -> bool:
        return self.engine.tasks.markup

    @property
    def architecture(self) -> str:
        return self.engine.tasks.architecture

    @property
    def page_mode(self) -> str | None:
        return self.engine.tasks.page

    def mode_for(self, kind: str) -> str:
        return self.engine.tasks.mode_for(kind)

    @property
    def limits(self) -> EngineLimits:
        """KV slots, ``max_model_len`` and KV-cache size, for reports."""
        return self.engine.limits

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    def queue_depths(self) -> dict[str, int]:
        """Sequences waiting for a KV slot (read off the engine thread: a momentary count)."""
        return {"ocr_sequences": self.engine.num_waiting}

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
        rgb, _ = await image_region(self._documents, image, options.box)
        prepare = functools.partial(
            self.engine.prepare,
            rgb,
            mode=options.mode,
            crop=options.crop,
            prompt=options.prompt,
            system=options.system,
        )
        try:
            prepared = await in_pool(self._pool, prepare)
        except ValueError as exc:  # text the model's prompt cannot take
            raise bad_request(f"the prompt cannot be built: {exc}") from None
        limit = self.settings.ocr_max_tokens  # a larger max_tokens is capped, as documented
        params = GenerationParams(
            max_tokens=min(options.max_tokens or limit, limit),
            ignore_eos=options.ignore_eos,
            sampling=options.sampling,
            repetition_penalty=options.repetition_penalty,
            no_repeat_ngram_size=options.no_repeat_ngram_size,
            stop=options.stop,
            skip_special_tokens=options.skip_special_tokens,
        )
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        deadline = deadlines.current.get()
        try:
            seq_id = self.engine.submit(
                prepared,
                params,
                lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                on_start=deadline.started_threadsafe if deadline is not None else None,
            )
        except PromptTooLong as exc:
            raise too_large(str(exc)) from None
        finished = False
        try:
            while not finished:
                event = coalesce(await events.get(), events)
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.engine.abort(seq_id)

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
