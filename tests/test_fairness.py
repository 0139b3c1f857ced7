"""Fair share across clients: the round-robin queue, then a bystander next to a flood on a
real server (the embedded line OCR's batchers, and the GOT-OCR2 engine's waiting queue)."""

from __future__ import annotations

import asyncio
import io

import pytest

from ragws.runtime import fairness
from ragws.runtime.fairness import FairQueue, client_scope

from .conftest import render_png


def test_fair_queue_takes_clients_in_turn_and_keeps_each_clients_order():
    queue: FairQueue[str] = FairQueue()
    for item, client in (("a0", "a"), ("a1", "a"), ("b0", "b"), ("a2", "a"), ("c0", "c")):
        queue.push(item, client)
    assert len(queue) == 5 and queue.clients == 3
    assert list(queue) == ["a0", "b0", "c0", "a1", "a2"]
    assert [queue.pop() for _ in range(3)] == ["a0", "b0", "c0"]
    queue.push("b1", "b")  # b emptied and left the turn: it comes back behind a
    assert [queue.pop() for _ in range(3)] == ["a1", "b1", "a2"]
    assert not queue and queue.peek() is None
    with pytest.raises(IndexError):
        queue.pop()


def test_fair_queue_drops_withdrawn_items_without_spending_a_turn():
    withdrawn = {"a0", "b0"}
    queue: FairQueue[str] = FairQueue(lambda item: item in withdrawn)
    for item, client in (("a0", "a"), ("a1", "a"), ("b0", "b"), ("c0", "c")):
        queue.push(item, client)
    assert queue.heads() == ["a1", "c0"]  # b had only a withdrawn item: b is gone
    assert len(queue) == 2 and queue.clients == 2
    assert queue.remove("c0") and not queue.remove("c0")
    assert [queue.pop()] == ["a1"] and len(queue) == 0


def test_fair_queue_can_serve_by_arrival_for_comparison(monkeypatch):
    monkeypatch.setattr(fairness, "fcfs", True)
    queue: FairQueue[str] = FairQueue()
    for item, client in (("a0", "a"), ("a1", "a"), ("b0", "b")):
        queue.push(item, client)
    assert [queue.pop() for _ in range(3)] == ["a0", "a1", "b0"]


def test_client_scope_sets_and_restores_the_context_key():
    assert fairness.current.get() is None
    with client_scope("ws 127.0.0.1:5 #1"):
        assert fairness.current.get() == "ws 127.0.0.1:5 #1"
    assert fairness.current.get() is None
    assert fairness.connection_key("ws", "p") != fairness.connection_key("ws", "p")


# --- on a real server -------------------------------------------------------------------------


class Ends:
    """The ids of a socket's requests in the order they end, read as their frames arrive.

    Every frame is read from the start: requests of one socket are prepared side by side, so
    they may reach the model (and end) in another order than they were sent."""

    def __init__(self, client) -> None:
        self.ids: list[object] = []
        self.streaming = asyncio.Event()  # a token of any request has arrived
        self._task = asyncio.ensure_future(self._watch(client))

    async def _watch(self, client) -> None:
        while True:
            frame = await client.recv(timeout=120)
            if frame["type"] == "token":
                self.streaming.set()
            if frame["type"] in ("done", "error"):
                self.ids.append(frame["id"])

    async def wait_for(self, count: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.ids) < count:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        # Before Python 3.12, asyncio.wait_for loses a cancel that lands as its frame arrives
        # (the watcher then reads on until its timeout): cancel until the task has ended.
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=0.1)
        await asyncio.gather(self._task, return_exceptions=True)


async def _ocr(client, request_id, image: bytes, **fields) -> dict:
    await client.send({"type": "ocr", "id": request_id, "image": image, **fields})
    return await client.until(request_id, "done", "error", timeout=120)


async def test_a_bystanders_line_ocr_finishes_long_before_a_flood_of_dense_pages(
    start_server, connect, paper_pdf, title_png
):
    server = await start_server(ocr_line_batch_size=8)
    page = render_png(paper_pdf, 1)  # a dense page: ~100 lines, ~13 recognition batches
    flood, _ = await connect(server)
    ends = Ends(flood)
    for i in range(4):
        await flood.send({"type": "ocr", "id": i, "image": page})
    await asyncio.wait_for(ends.streaming.wait(), 120)  # the flood's lines are being read
    # Connected only now: a socket that reads nothing fails the heartbeat on a slow machine.
    bystander, _ = await connect(server)
    done = await _ocr(bystander, "small", title_png)
    ended_before = list(ends.ids)
    await ends.stop()
    assert done["type"] == "done" and done["finish_reason"] == "stop", done
    # Served in turn, the bystander's few lines went in with the flood's next batches, not
    # behind its ~400 lines: the flood was still running when it finished.
    assert len(ended_before) <= 1, ended_before
    await flood.ws.close()
    # Its batch mates changed nothing in what it read.
    alone = await _ocr(bystander, "alone", title_png)
    assert alone["text"] == done["text"] and done["text"]


async def test_a_bystanders_sequence_gets_the_next_free_kv_slot(
    start_server, connect, got_tiny_dir
):
    from ragws.testing.got_tiny import synthetic_images

    images = synthetic_images(2, seed=5)
    server = await start_server(ocr_model=str(got_tiny_dir), ocr_batch_size=2, max_model_len=512)
    fields = {"max_tokens": 40, "ignore_eos": True, "mode": "plain"}
    flood, _ = await connect(server)
    ends = Ends(flood)
    for i in range(8):  # two decoding, six waiting
        await flood.send({"type": "ocr", "id": i, "image": _png(images[0]), **fields})
    await asyncio.wait_for(ends.streaming.wait(), 60)
    bystander, _ = await connect(server)
    done = await _ocr(bystander, "small", _png(images[1]), **fields)
    ended_before = list(ends.ids)
    await ends.wait_for(8, timeout=180)
    await ends.stop()
    assert done["finish_reason"] == "length", done
    # Behind six waiting sequences by arrival, it would have ended after six of the flood's
    # at least; in turn, it took the first slot that freed.
    assert len(ended_before) <= 4, ended_before
    # The engine sets its gauges after a step's tokens are out: give it that step.
    async with asyncio.timeout(30):
        while await server.metric("ragws_kv_slots_used") != 0:
            await asyncio.sleep(0.05)
    alone = await _ocr(bystander, "alone", _png(images[1]), **fields)
    assert alone["text"] == done["text"]


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
