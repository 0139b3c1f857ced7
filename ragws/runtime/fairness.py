"""Fair share: the shared queues serve clients in turn, not strictly by arrival.

Every model queue (the layout and line-OCR batchers, the page-model batchers, the OCR engine's
waiting sequences) is shared by all clients. Served first come, first served, one client's
burst (six dense pages: thousands of text lines) would sit in front of everyone else's work,
and a bystander's one small page would wait for all of it. So each queue is a
:class:`FairQueue`: one FIFO per client, taken from in turn, one item each (round robin by
items, in the order the clients' queues became non-empty). A bystander's item goes into the
next batch, or the next free KV slot, whatever another client has queued; items of one client
still go in the order they came; and what a model computes for an item never depends on its
batch mates, so results are the same under either order.

Who is a client: the connection a request came on. A WebSocket is one client, whatever it has
in flight; an HTTP request is one client (its connection carries one request at a time). The
server's API key is one key shared by every client, so it tells no tenant from another, and
keying by it would put everyone back in one queue. Opening more sockets gets more shares;
``max_inflight_per_socket`` and ``max_concurrent`` bound what that buys.

The key travels as :mod:`ragws.runtime.deadlines`' deadline does: in a context variable, set where a
request's task starts (:func:`client_scope`) and carried into every task it starts, so the
batchers and the engine read it when an item is submitted and no call in between passes it on.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

#: The client of the request running in this context; None outside any request.
current: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar(
    "ragws_client", default=None
)

#: Serve every queue in arrival order instead (the policy before fair share), so that a
#: benchmark can compare the two in one process. Read at each push; not a setting.
fcfs = False

_connections = itertools.count(1)


def connection_key(kind: str, peer: str) -> str:
    """A client key for one connection: readable in logs, unique even when peers repeat."""
    return f"{kind} {peer} #{next(_connections)}"


@contextlib.contextmanager
def client_scope(key: Hashable) -> Iterator[None]:
    """Run the block (and every task it starts) as client ``key``."""
    token = current.set(key)
    try:
        yield
    finally:
        current.reset(token)


_GAP = object()


class FairQueue(Generic[T]):
    """Per-client FIFO queues, taken from round robin.

    :meth:`pop` takes the front item of the client whose turn it is and passes the turn to the
    next client with items; a client whose queue empties leaves the turn and joins at the back
    when it pushes again. Items for which ``withdrawn`` is true (a cancelled caller) are
    dropped when they reach their client's front, never returned. Not thread-safe: each queue
    belongs to one thread (the event loop, or the OCR engine's).
    """

    def __init__(self, withdrawn: Callable[[T], bool] | None = None) -> None:
        self._withdrawn = withdrawn
        self._queues: dict[Hashable, deque[T]] = {}
        self._turn: deque[Hashable] = deque()  # clients with items; the front one is next
        self._len = 0

    def __len__(self) -> int:
        """Items held, withdrawn ones included until they reach their client's front."""
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        """Every item, in the order :meth:`pop` would take them if nothing else arrived."""
        rounds = itertools.zip_longest(*(self._queues[c] for c in self._turn), fillvalue=_GAP)
        return (item for round_ in rounds for item in round_ if item is not _GAP)

    @property
    def clients(self) -> int:
        """Clients with items queued."""
        return len(self._turn)

    def push(self, item: T, client: Hashable | None = None) -> None:
        if fcfs:
            client = None
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
            self._turn.append(client)
        queue.append(item)
        self._len += 1

    def peek(self) -> T | None:
        """The item :meth:`pop` would take, or None when no live item is queued."""
        while self._turn:
            client = self._turn[0]
            if self._prune(client):
                return self._queues[client][0]
        return None

    def pop(self) -> T:
        """Take the next item and pass the turn on; IndexError when none is queued."""
        item = self.peek()
        if item is None:
            raise IndexError("pop from an empty FairQueue")
        client = self._turn[0]
        queue = self._queues[client]
        queue.popleft()
        self._len -= 1
        if queue:
            self._turn.rotate(-1)
        else:
            self._turn.popleft()
            del self._queues[client]
        return item

    def heads(self) -> list[T]:
        """Each client's oldest live item (withdrawn fronts are dropped on the way)."""
        return [self._queues[c][0] for c in list(self._turn) if self._prune(c)]

    def remove(self, item: T) -> bool:
        """Take ``item`` out wherever it is; False if it is not queued."""
        for client, queue in self._queues.items():
            if item in queue:
                queue.remove(item)
                self._len -= 1
                if not queue:
                    self._forget(client)
                return True
        return False

    def drain(self) -> list[T]:
        """Empty the queue; every item it held, withdrawn ones included."""
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        self._turn.clear()
        self._len = 0
        return items

    def _prune(self, client: Hashable) -> bool:
        """Drop ``client``'s withdrawn front items; whether it still has any."""
        queue = self._queues[client]
        if self._withdrawn is not None:
            while queue and self._withdrawn(queue[0]):
                queue.popleft()
                self._len -= 1
        if not queue:
            self._forget(client)
            return False
        return True

    def _forget(self, client: Hashable) -> None:
        del self._queues[client]
        self._turn.remove(client)
