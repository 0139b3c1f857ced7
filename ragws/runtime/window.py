"""A document's pages worked on concurrently, within a window that only its reader frees.

A PDF request queues many pages at once so they fill batches (with each other and with other
clients' pages), but a long document must not hold hundreds of rendered pages, nor its
finished results pile up for a client that reads slowly. The window counts a page from the
moment its work starts until the reader has taken its result, so a reader that stops (its
socket's send queue full) stops the document's work after at most ``size`` pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

from ragws.runtime.tasks import cancel_all

T = TypeVar("T")
R = TypeVar("R")


async def windowed(
    items: Iterable[T], work: Callable[[T], Awaitable[R]], size: int
) -> AsyncIterator[R]:
    """Yield ``work(item)`` for every item as each completes (completion order), with at most
    ``size`` items between starting and being taken by the reader. Closing the iterator early
    (or an item failing) cancels the rest."""
    window = asyncio.Semaphore(size)

    async def one(item: T) -> R:
        await window.acquire()  # released by the reader, once it has taken the result
        return await work(item)

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
            window.release()
    finally:
        await cancel_all(tasks)
