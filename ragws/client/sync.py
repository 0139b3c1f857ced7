"""The blocking client: :class:`Client` runs an :class:`~ragws.client.aio.AsyncClient` on a
private event-loop thread and waits for each call; its streams are plain iterators
(:class:`SyncStream`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

from ragws.client.aio import DEFAULT_URL, AsyncClient, Connecting
from ragws.client.streams import ItemT, ResultT, Stream
from ragws.client.types import (
    Document,
    Hello,
    Layout,
    OcrResult,
    ParsedPage,
    PdfPage,
    PdfSummary,
    RequestId,
    Token,
)

T = TypeVar("T")


class Client:
    """The operations of :class:`AsyncClient` as blocking calls, for code without asyncio.

    An :class:`AsyncClient` runs on a private event-loop thread; streams become plain
    iterators (:class:`SyncStream`). Use it as a context manager, or call :meth:`close`.
    Do not call it from inside a running event loop: it would block that loop.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 4.0,
        open_timeout: float = 30.0,
        heartbeat: float | None = 30.0,
        deadline_ms: float | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ragws-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncClient(
            url,
            api_key=api_key,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            open_timeout=open_timeout,
            deadline_ms=deadline_ms,
            heartbeat=heartbeat,
        )
        try:
            self._run(Connecting(self._async).open())
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, **options: Any) -> Client:
        """A connected client; options as :class:`AsyncClient`."""
        return cls(url, **options)

    @property
    def hello(self) -> Hello:
        return self._async.hello

    @property
    def url(self) -> str:
        return self._async.url

    def close(self) -> None:
        """Close the socket and stop the client's thread."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def layout(
        self, image: bytes, *, conf: float | None = None, iou: float | None = None
    ) -> Layout:
        return self._run(self._async.layout(image, conf=conf, iou=iou))

    def pdf(
        self,
        data: bytes,
        *,
        pages: Sequence[int] | None = None,
        scale: float = 2.0,
        images: bool = False,
        conf: float | None = None,
        iou: float | None = None,
    ) -> SyncStream[PdfPage, PdfSummary]:
        stream = self._async.pdf(data, pages=pages, scale=scale, images=images, conf=conf, iou=iou)
        return SyncStream(self, stream)

    def ocr(
        self,
        image: bytes,
        *,
        mode: str = "format",
        max_tokens: int | None = None,
        box: Sequence[float] | None = None,
        crop: bool = False,
        ignore_eos: bool = False,
        prompt: str | None = None,
    ) -> SyncStream[Token, OcrResult]:
        stream = self._async.ocr(
            image,
            mode=mode,
            max_tokens=max_tokens,
            box=box,
            crop=crop,
            ignore_eos=ignore_eos,
            prompt=prompt,
        )
        return SyncStream(self, stream)

    def ocr_text(
        self,
        image: bytes,
        *,
        mode: str = "format",
        max_tokens: int | None = None,
        box: Sequence[float] | None = None,
        crop: bool = False,
        prompt: str | None = None,
    ) -> str:
        return self._run(
            self._async.ocr_text(
                image, mode=mode, max_tokens=max_tokens, box=box, crop=crop, prompt=prompt
            )
        )

    def parse(
        self,
        data: bytes,
        *,
        pages: Sequence[int] | None = None,
        text: str = "auto",
        chunk_chars: int = 1500,
        scale: float = 2.0,
        figures: bool = False,
        furniture: bool = False,
    ) -> SyncStream[ParsedPage, Document]:
        stream = self._async.parse(
            data,
            pages=pages,
            text=text,
            chunk_chars=chunk_chars,
            scale=scale,
            figures=figures,
            furniture=furniture,
        )
        return SyncStream(self, stream)

    def parse_document(
        self,
        data: bytes,
        *,
        pages: Sequence[int] | None = None,
        text: str = "auto",
        chunk_chars: int = 1500,
        scale: float = 2.0,
        figures: bool = False,
        furniture: bool = False,
        connections: int = 1,
        pages_per_request: int | None = None,
        on_page: Callable[[ParsedPage], object] | None = None,
    ) -> Document:
        """As :meth:`AsyncClient.parse_document`; ``on_page`` runs on the client's thread."""
        return self._run(
            self._async.parse_document(
                data,
                pages=pages,
                text=text,
                chunk_chars=chunk_chars,
                scale=scale,
                figures=figures,
                furniture=furniture,
                connections=connections,
                pages_per_request=pages_per_request,
                on_page=on_page,
            )
        )

    def cancel(self, request_id: RequestId) -> bool:
        return self._run(self._async.cancel(request_id))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for it; an interrupt cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class SyncStream(Generic[ItemT, ResultT]):
    """A stream of :class:`Client`: iterate it, then read :attr:`result`.

    Leaving early (``close()``, the end of a ``with`` block, or dropping it) cancels the
    request on the server, as with the async streams.
    """

    def __init__(self, client: Client, stream: Stream[ItemT, ResultT]) -> None:
        self._client = client
        self._stream = stream

    @property
    def id(self) -> RequestId:
        return self._stream.id

    @property
    def result(self) -> ResultT:
        return self._stream.result

    def __iter__(self) -> SyncStream[ItemT, ResultT]:
        return self

    def __next__(self) -> ItemT:
        more, item = self._client._run(_step(self._stream))
        if not more:
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        if not self._client._loop.is_closed():
            self._client._run(self._stream.aclose())

    def __enter__(self) -> SyncStream[ItemT, ResultT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _step(stream: Stream[ItemT, ResultT]) -> tuple[bool, ItemT | None]:
    # StopAsyncIteration is turned into a flag: a future should not carry it across threads.
    try:
        return True, await stream.__anext__()
    except StopAsyncIteration:
        return False, None
