"""Small asyncio pieces every service uses the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


async def in_pool(pool: Executor | None, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on ``pool`` (None: the loop's default executor), off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def cancel_all(tasks: Iterable[asyncio.Future[object]]) -> None:
    """Cancel ``tasks`` and wait until each has ended; what they raise stays theirs."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
