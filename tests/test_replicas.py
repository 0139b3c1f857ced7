"""Many replicas behind a load balancer: readiness, draining, and HAProxy in front of three.

The first tests look at one replica (``GET /ready``, the SIGTERM drain, the gauges); the
rest run three real ``ragws serve`` processes on loopback behind Debian's ``haproxy``
(:mod:`ragws.testing.cluster`, the configuration ``deploy/haproxy/haproxy.cfg`` ships) and
drive them through it: every interface, clients spread over the replicas, a replica drained
with SIGTERM while it streams, and one killed with SIGKILL under documents split over several
connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from ragws.client import AsyncClient, RagwsError
from ragws.config import Settings
from ragws.testing.cluster import (
    LocalCluster,
    Replica,
    free_port,
    haproxy_binary,
    metric_sum,
    metrics,
)

from . import documents
from .conftest import render_png

#: Replicas are light: the embedded models, one document worker, no start-up measurement.
LIGHT = ("--layout-preferred-batch-size", "1", "--log-level", "info")
if "document_workers" in Settings.__dataclass_fields__:
    LIGHT += ("--document-workers", "1")


def replica(tmp_path: Path, *flags: str) -> Replica:
    return Replica("r", free_port(), (*LIGHT, *flags), tmp_path / "replica.log")


async def until(check: Any, timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll ``check`` (blocking, run in a thread) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)


async def get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as resp:
        body = await resp.read()
        try:
            data = json.loads(body)
        except ValueError:
            data = body.decode(errors="replace")
        return resp.status, dict(resp.headers), data


async def handshake_status(ws_url: str) -> tuple[int, dict[str, str]]:
    """101 when the WebSocket opened (and is closed again at once), else the HTTP status."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(ws_url) as ws:
                await ws.close()
                return 101, {}
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, dict(exc.headers or {})


# --- one replica ----------------------------------------------------------------------------


async def test_ready_says_starting_until_the_models_are_loaded(tmp_path):
    # Measuring the layout batch size at start-up takes seconds: /ready must say so meanwhile,
    # to probes that send neither the key nor one of the allowed host names.
    server = replica(
        tmp_path,
        "--ocr-model", "none",
        "--layout-preferred-batch-size", "auto",
        "--api-key", "sesame",
        "--allowed-hosts", "docs.example",
    )  # fmt: skip
    server.start()
    try:
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status, _, body = await get(
                    server.url + "/ready", headers={"Host": "10.1.2.3:7088"}
                )
            except aiohttp.ClientConnectionError:
                assert server.running, server.log()
                await asyncio.sleep(0.05)
                continue
            seen.append((status, body["status"]))
            if status == 200:
                break
            assert (status, body["ready"], body["status"]) == (503, False, "starting")
            if len(seen) == 1:  # while starting: a handshake is refused with Retry-After too
                code, handshake_headers = await handshake_status(server.url + "/ws")
                assert code == 503 and handshake_headers["Retry-After"] == "1"
                health, _, health_body = await get(server.url + "/health")
                assert (health, health_body["status"]) == (503, "starting")
            await asyncio.sleep(0.05)
        assert seen[0] == (503, "starting") and seen[-1] == (200, "ready"), seen
        assert body["reasons"] == [] and body["max_concurrent"] == 100
        assert "layout" in body["queues"]
        # Past the probes, the key is still required.
        status = (await get(server.url + "/metrics", headers={"Host": "docs.example"}))[0]
        assert status == 401
    finally:
        server.stop()


async def test_ready_turns_503_while_saturated(start_server, paper_pdf, connect):
    # One request at a time: a page read line by line holds the only slot for seconds.
    server = await start_server(max_concurrent=1, ocr_line_batch_size=1)
    page = render_png(paper_pdf, 1, scale=2.0)
    client, _ = await connect(server)
    status, _, body = await get(server.url + "/ready")
    assert (status, body["status"], await server.metric("ragws_ready")) == (200, "ready", 1.0)
    await client.send({"type": "ocr", "id": "page", "image": page})
    await client.until("page", "token")
    status, _, body = await get(server.url + "/ready")
    assert (status, body["ready"], body["status"]) == (503, False, "saturated")
    assert body["reasons"] == ["1 requests in flight (max_concurrent)"]
    assert await server.metric("ragws_ready") == 0.0
    await client.send({"type": "cancel", "id": "page"})
    await client.until("page", "done")
    for _ in range(200):
        if (await get(server.url + "/ready"))[0] == 200:
            break
        await asyncio.sleep(0.02)
    assert await server.metric("ragws_ready") == 1.0

    # A queue of text lines over ready_max_ocr_waiting saturates a replica with room left.
    server = await start_server(ready_max_ocr_waiting=2, ocr_line_batch_size=1)
    client, _ = await connect(server)
    await client.send({"type": "ocr", "id": "page", "image": page})
    await client.until("page", "token")
    status, _, body = await get(server.url + "/ready")
    assert (status, body["status"]) == (503, "saturated")
    waiting = body["queues"]["ocr_recognize"]
    assert waiting > 2 and body["reasons"] == [
        f"{waiting} OCR items waiting, over ready_max_ocr_waiting=2"
    ]
    assert await server.metric("ragws_queue_depth", {"queue": "ocr_recognize"}) > 2
    assert await server.metric("ragws_max_concurrent") == 100.0


async def test_sigterm_readiness_first_then_refusals_then_1001(tmp_path, paper_pdf):
    server = replica(
        tmp_path, "--ocr-line-batch-size", "1", "--drain-delay-s", "2", "--shutdown-grace-s", "60"
    )
    server.start()
    try:
        await asyncio.to_thread(server.wait_ready, 120)
        ws_url = server.url.replace("http", "ws") + "/ws"
        async with aiohttp.ClientSession() as http:
            streaming = await http.ws_connect(ws_url, max_msg_size=0)
            await streaming.receive()  # hello
            page = render_png(paper_pdf, 1, scale=2.0)
            await streaming.send_bytes(msgpack.packb({"type": "ocr", "id": "long", "image": page}))
            frames = []
            while not frames or frames[-1]["type"] != "token":
                frames.append(msgpack.unpackb((await streaming.receive()).data))
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)

            # 1. At once: /ready 503, and the open socket is told to go elsewhere.
            for _ in range(100):
                status, _, body = await get(server.url + "/ready")
                if status == 503:
                    break
                await asyncio.sleep(0.02)
            assert (status, body["status"]) == (503, "draining")
            while frames[-1]["type"] != "goaway":
                frames.append(msgpack.unpackb((await streaming.receive()).data))
            assert frames[-1] == {"type": "goaway", "reason": "shutdown"}

            # 2. During drain_delay_s, work is still served: a new socket, a layout request.
            assert time.monotonic() - signalled < 2, "the checks below need the delay"
            late = await http.ws_connect(ws_url, max_msg_size=0)
            hello = msgpack.unpackb((await late.receive()).data)
            assert hello["type"] == "hello"
            small = render_png(paper_pdf, 0, scale=0.5)
            await late.send_bytes(msgpack.packb({"type": "layout", "id": 1, "image": small}))
            answers = [msgpack.unpackb((await late.receive()).data)]
            while answers[-1]["type"] != "layout":
                answers.append(msgpack.unpackb((await late.receive()).data))
            await late.close()

            # 3. Then refusals that are answers: 503 + Retry-After, the listener still open.
            while (code := await handshake_status(ws_url))[0] == 101:
                await asyncio.sleep(0.02)
            assert code[0] == 503 and code[1]["Retry-After"] == "1"
            assert time.monotonic() - signalled >= 2  # not before drain_delay_s
            form = aiohttp.FormData()
            form.add_field("file", paper_pdf, filename="paper.pdf")
            async with http.post(server.url + "/parse", data=form) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"] == "unavailable"
            assert (await get(server.url + "/health"))[0] == 200  # alive while draining
            samples = await asyncio.to_thread(metrics, server.url)
            assert samples["ragws_draining"] == 1.0 and samples["ragws_ready"] == 0.0
            await streaming.send_bytes(msgpack.packb({"type": "layout", "id": 2, "image": small}))

            # 4. The stream in flight finishes; the socket closes with 1001; exit 0.
            async for message in streaming:
                frames.append(msgpack.unpackb(message.data))
            refusal = next(f for f in frames if f.get("id") == 2)
            assert refusal["type"] == "error" and refusal["code"] == "overloaded"
            done = next(f for f in frames if f["type"] == "done")
            assert (done["id"], done["finish_reason"]) == ("long", "stop")
            assert streaming.close_code == 1001
        assert await asyncio.to_thread(server.proc.wait, 60) == 0  # type: ignore[union-attr]
        log = server.log()
        assert "shutting down: 1 request(s) in flight" in log
        assert "grace period over" not in log
    finally:
        server.stop()


# --- three replicas behind HAProxy ----------------------------------------------------------


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if haproxy_binary() is None:
        pytest.skip("haproxy is not installed (.ci/run installs it: apt-get install haproxy)")
    cluster = LocalCluster(
        tmp_path_factory.mktemp("cluster"),
        count=3,
        flags=(*LIGHT, "--shutdown-grace-s", "30", "--max-pages", "50"),
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(balanced: LocalCluster) -> LocalCluster:
    """The three replicas, all up (a test that stopped one has it started again)."""
    balanced.ensure_up()
    return balanced


def requests_served(replica: Replica, **labels: str) -> float:
    return metric_sum(metrics(replica.url), "ragws_requests_total", **labels)


async def test_every_interface_works_through_the_balancer(cluster, paper_pdf, title_png):
    png = render_png(paper_pdf, 0, scale=1.0)
    async with AsyncClient.connect(cluster.ws_url) as client:
        layout = await client.layout(png)
        assert "title" in layout.classes
        stream = client.pdf(paper_pdf, pages=[0, 1], scale=1.0)
        assert sorted([page.page async for page in stream]) == [0, 1]
        assert stream.result.page_count == documents.PAGES
        ocr = client.ocr(title_png)
        tokens = [token.text async for token in ocr]
        assert "".join(tokens) == ocr.result.text and "Blockwise" in ocr.result.text
        doc = await client.parse_document(paper_pdf, pages=[0], text="pdf")
        assert doc.markdown.startswith(f"# {documents.TITLE}")

    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData({"stream": "true"})
        form.add_field("image", title_png, filename="title.png")
        async with http.post(cluster.url + "/ocr", data=form) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = (await resp.text()).strip().split("\n\n")
        texts = [json.loads(e[len("data: ") :])["token"] for e in events[:-1]]
        assert "Blockwise" in "".join(texts)
        assert events[-1].startswith("event: done")

        form = aiohttp.FormData({"stream": "true", "pages": "0,1", "text": "pdf"})
        form.add_field("file", paper_pdf, filename="paper.pdf")
        async with http.post(cluster.url + "/parse", data=form) as resp:
            assert resp.headers["Content-Type"] == "application/x-ndjson"
            lines = [json.loads(line) for line in (await resp.text()).splitlines()]
        assert sorted(line["page"] for line in lines[:-1]) == [0, 1]
        assert lines[-1]["type"] == "done" and documents.TITLE in lines[-1]["markdown"]


async def test_thirty_clients_spread_over_the_replicas(cluster, paper_pdf):
    before = [await asyncio.to_thread(requests_served, r, type="layout") for r in cluster.replicas]
    png = render_png(paper_pdf, 0, scale=0.75)
    # Every client holds its own socket open, as a real client does: leastconn spreads them.
    clients = await asyncio.gather(*(AsyncClient.connect(cluster.ws_url) for _ in range(30)))
    try:
        layouts = await asyncio.gather(*(client.layout(png) for client in clients))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    assert all("title" in layout.classes for layout in layouts)
    after = [await asyncio.to_thread(requests_served, r, type="layout") for r in cluster.replicas]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 30 and min(served) > 0, served


async def test_sigterm_drains_a_streaming_replica_without_failing_a_request(cluster, paper_pdf):
    target = cluster.replicas[0]
    stop = asyncio.Event()
    failures: list[tuple[int, str, str]] = []
    served_after_exit: Counter[int] = Counter()

    async def user(i: int) -> None:
        options = dict(retries=8, backoff=0.1, max_backoff=1.0)
        async with AsyncClient.connect(cluster.ws_url, **options) as client:
            while not stop.is_set():
                try:
                    doc = await client.parse_document(paper_pdf, pages=[0, 1, 2], text="pdf")
                except RagwsError as exc:
                    failures.append((i, exc.code, exc.message))
                    continue
                assert doc.markdown.startswith(f"# {documents.TITLE}")
                if not target.running:
                    served_after_exit[i] += 1

    users = [asyncio.create_task(user(i)) for i in range(6)]
    try:
        # It streams: requests in flight on the replica about to be stopped.
        await until(
            lambda: metrics(target.url).get("ragws_inflight_requests", 0) >= 1, 60, "in flight"
        )
        target.signal(signal.SIGTERM)
        # /ready turns 503 at once; one failed check takes the replica out of the rotation.
        waited = await asyncio.to_thread(cluster.wait_status, "r0", ("DOWN", "NOLB", "MAINT"), 10)
        assert waited < 5
        sent_to_it = int(cluster.stats()["r0"]["stot"])
        fresh = await asyncio.gather(*(AsyncClient.connect(cluster.ws_url) for _ in range(6)))
        try:
            small = render_png(paper_pdf, 0, scale=0.5)
            await asyncio.gather(*(client.layout(small) for client in fresh))
        finally:
            await asyncio.gather(*(client.close() for client in fresh))
        assert int(cluster.stats()["r0"]["stot"]) == sent_to_it  # no new connection reached it
        # Its requests in flight finish, and it exits on its own, well within the grace.
        assert await asyncio.to_thread(target.proc.wait, 60) == 0  # type: ignore[union-attr]
        drained = re.search(r"shutting down: (\d+) request\(s\) in flight", target.log())
        assert drained is not None and int(drained.group(1)) >= 1
        assert "grace period over" not in target.log()
        # Every user goes on, on the survivors.
        await until(lambda: len(served_after_exit) == len(users), 90, "users on the survivors")
    finally:
        stop.set()
        await asyncio.gather(*users)
    assert failures == []


async def test_sigkill_a_replica_every_split_document_completes_once(cluster, paper_pdf, caplog):
    caplog.set_level(logging.INFO, logger="ragws.client")
    async with AsyncClient.connect(cluster.replicas[2].url.replace("http", "ws") + "/ws") as one:
        reference = await one.parse_document(paper_pdf, text="pdf", chunk_chars=600)
    arrived = Counter[int]()

    async def parse(i: int) -> Any:
        options = dict(retries=8, backoff=0.1, max_backoff=1.0)
        async with AsyncClient.connect(cluster.ws_url, **options) as client:
            return await client.parse_document(
                paper_pdf,
                text="pdf",
                chunk_chars=600,
                connections=3,
                pages_per_request=2,
                on_page=lambda page: arrived.update([i]),
            )

    docs = [asyncio.create_task(parse(i)) for i in range(3)]
    try:

        def busiest() -> Replica | None:
            if sum(arrived.values()) < 3:
                return None
            loads = [
                (metrics(r.url).get("ragws_inflight_requests", 0), r) for r in cluster.replicas
            ]
            load, victim = max(loads, key=lambda item: item[0])
            return victim if load >= 1 else None

        victim = await until(busiest, 60, "a replica with ranges in flight")
        victim.signal(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*docs), 180)
    finally:
        for task in docs:
            task.cancel()
    assert victim.proc is not None and victim.proc.wait(10) == -signal.SIGKILL
    for doc in results:
        assert [page.page for page in doc.pages] == list(range(documents.PAGES))  # once each
        assert doc.markdown == reference.markdown
        assert doc.chunks == reference.chunks
    assert "sent again" in caplog.text  # ranges on the killed replica were sent elsewhere
