"""Streaming requests (``pdf``, ``ocr``, ``parse``): async iterators of their items, then a result.

A stream holds no socket of its own: it asks its :class:`ragws.client.aio.AsyncClient` to send
the request on the first step of the iteration, reads the frames routed to it, and turns each
into an item (a page, a token) and the ``done`` frame into the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from ragws.client.connection import Call
from ragws.client.types import (
    Document,
    Frame,
    OcrResult,
    ParsedPage,
    PdfPage,
    PdfSummary,
    RagwsError,
    RequestId,
    Token,
)

if TYPE_CHECKING:
    from ragws.client.aio import AsyncClient

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class Stream(Generic[ItemT, ResultT]):
    """A streaming request: iterate its items, then read :attr:`result`.

    The request is sent on the first step of the iteration. Leaving early (``aclose()``, the
    end of an ``async with`` block, or dropping the stream, as ``break`` out of
    ``async for x in client.ocr(...)`` does) cancels it on the server.
    """

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        self.id: RequestId = client._new_id()
        self._client = client
        self._fields = fields
        self._call: Call | None = None
        self._ended = False
        self._received = 0  # items so far
        self._result: ResultT | None = None
        self._error: RagwsError | None = None

    def __aiter__(self) -> Stream[ItemT, ResultT]:
        return self

    async def __anext__(self) -> ItemT:
        if self._ended:
            raise StopAsyncIteration
        try:
            if self._call is None:
                self._call, frame = await self._client._start(self.id, self._fields)
            else:
                frame = await self._call.receive()
        except RagwsError as exc:
            self._ended, self._error = True, exc
            raise
        if frame.get("type") == "done":
            self._ended = True
            self._result = self._finish(frame)
            raise StopAsyncIteration
        self._received += 1
        return self._item(frame)

    @property
    def result(self) -> ResultT:
        """The request's final result; raises its error if it failed."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError(f"request {self.id} has not ended: iterate the stream to its end")
        return self._result

    async def aclose(self) -> None:
        """Stop here: the server is told to cancel the request unless it has already ended."""
        was_open = self._call is not None and not self._ended
        self._ended = True
        if was_open:
            await self._client._abandon(self._call)

    async def __aenter__(self) -> Stream[ItemT, ResultT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._call is not None and not self._ended:
            self._client._abandon_soon(self._call)

    def _item(self, frame: Frame) -> ItemT:
        raise NotImplementedError

    def _finish(self, frame: Frame) -> ResultT:
        raise NotImplementedError


class PdfStream(Stream[PdfPage, PdfSummary]):
    """Pages of a ``pdf`` request in completion order; :attr:`result` is a :class:`PdfSummary`."""

    def _item(self, frame: Frame) -> PdfPage:
        return PdfPage.from_frame(frame)

    def _finish(self, frame: Frame) -> PdfSummary:
        return PdfSummary.from_frame(frame, self._received)


class OcrStream(Stream[Token, OcrResult]):
    """Tokens of an ``ocr`` request as they are read; :attr:`result` is an :class:`OcrResult`."""

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        super().__init__(client, fields)
        self._parts: list[str] = []

    def _item(self, frame: Frame) -> Token:
        self._parts.append(frame["text"])
        return Token.from_frame(frame)

    def _finish(self, frame: Frame) -> OcrResult:
        return OcrResult.from_frame(frame, "".join(self._parts))


class ParseStream(Stream[ParsedPage, Document]):
    """Pages of a ``parse`` request in completion order; :attr:`result` is a :class:`Document`."""

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        super().__init__(client, fields)
        self._pages: list[ParsedPage] = []
        self._frames: list[Frame] = []  # as sent: a document split in ranges is put together

    def _item(self, frame: Frame) -> ParsedPage:
        page = ParsedPage.from_frame(frame)
        self._pages.append(page)
        self._frames.append(frame)
        return page

    def _finish(self, frame: Frame) -> Document:
        return Document.from_frame(frame, self._pages)


async def drain(
    stream: Stream[ItemT, ResultT], on_item: Callable[[ItemT], object] | None = None
) -> ResultT:
    """Iterate ``stream`` to its end, calling ``on_item`` with each item, and return its result.

    Leaving by an error or a cancellation closes the stream, which cancels the request.
    """
    async with stream:
        async for item in stream:
            if on_item is not None:
                on_item(item)
    return stream.result
