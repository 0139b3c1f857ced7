"""Graceful shutdown of ``ragws serve`` (a real subprocess, real signals, real sockets)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import aiohttp
import msgpack

from .conftest import render_png


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start(port: int, *flags: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "RAGWS_LAYOUT_PREFERRED_BATCH_SIZE": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ragws", "serve", "--port", str(port), *flags,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientError:
                assert proc.returncode is None, await proc.stdout.read()  # type: ignore[union-attr]
            await asyncio.sleep(0.3)
    raise AssertionError("server did not come up")


async def until_inflight(http: aiohttp.ClientSession, port: int, count: int) -> None:
    for _ in range(500):
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            if f"ragws_inflight_requests {float(count)}" in await resp.text():
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} requests in flight")


async def frames_until_close(ws: aiohttp.ClientWebSocketResponse) -> list[dict]:
    frames = []
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            frames.append(msgpack.unpackb(message.data))
    return frames


async def refused_from_now_on(http: aiohttp.ClientSession, url: str) -> None:
    """Handshakes until one is refused (the signal has been handled), then a few more: once
    the server drains, none may upgrade, whether the listener is gone (connection refused)
    or the connection was accepted as it closed (503)."""

    async def refused() -> bool:
        try:
            async with http.ws_connect(url) as ws:
                await ws.close()
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 503, exc
            return True
        except aiohttp.ClientConnectorError:
            return True
        return False

    for _ in range(200):
        if await refused():
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("handshakes were still accepted long after SIGTERM")
    for _ in range(5):
        assert await refused()


async def test_sigterm_finishes_short_work_ends_long_work_and_exits_0(paper_pdf, title_png):
    port = free_port()
    # One line per recognition call: a full page takes many seconds, a title a fraction.
    proc = await start(port, "--ocr-line-batch-size", "1", "--shutdown-grace-s", "2")
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        async with aiohttp.ClientSession() as http:
            slow = await http.ws_connect(url, max_msg_size=0)
            quick = await http.ws_connect(url, max_msg_size=0)
            for ws in (slow, quick):
                await ws.receive()  # hello
            # The short request goes first, so its three lines are recognised ahead of the long
            # request's ~100; both are in flight when the signal arrives.
            short = {"type": "ocr", "id": "short", "image": title_png}
            await quick.send_bytes(msgpack.packb(short))
            page = render_png(paper_pdf, 1, scale=2.0)
            await slow.send_bytes(msgpack.packb({"type": "ocr", "id": "long", "image": page}))
            await until_inflight(http, port, 2)
            proc.send_signal(signal.SIGTERM)
            closing = asyncio.gather(frames_until_close(slow), frames_until_close(quick))
            await refused_from_now_on(http, url)
            slow_frames, quick_frames = await closing
            # The short request finished normally within the grace period; the long one was
            # ended with "shutdown"; both sockets were closed with 1001 (going away).
            assert quick_frames[-1]["type"] == "done"
            assert quick_frames[-1]["finish_reason"] == "stop"
            assert slow_frames[-1] == {"type": "done", "id": "long", "finish_reason": "shutdown"}
            assert any(f["type"] == "token" for f in slow_frames)  # it was under way
            assert slow.close_code == 1001 and quick.close_code == 1001
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, output.decode()
        assert b"shutting down: 2 request(s) in flight" in output
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
