"""OCR tokens/s through the OpenAI-compatible API against the same through the WebSocket.

What it measures
----------------
One ``ragws serve`` (spawned on a free loopback port) with a random-weight GOT-OCR2 of the real
architecture (``--size mid`` by default, as ``ocr_bench.py``; ``--model DIR`` for a checkpoint
on disk) answers the same OCR requests two ways, in one run:

* **WebSocket** — ``--streams`` clients, each on its own socket, each streaming one ``ocr``
  request at a time (``ignore_eos``, ``--max-tokens``);
* **OpenAI API** — ``--streams`` clients, each streaming one ``POST /v1/chat/completions`` at a
  time (``stream: true``, ``stream_options.include_usage``, vLLM's ``ignore_eos``, the same
  ``max_tokens``), the image as a ``data:`` URL. ``--client aiohttp`` (the default) reads the
  Server-Sent Events with a plain aiohttp reader, as light as the WebSocket side's msgpack
  reader, so that the two sides differ only in the server's transport; ``--client openai``
  uses the official ``openai`` package's ``AsyncOpenAI`` (its per-chunk parsing then runs on
  the same cores as the server).

Each client sends ``--requests`` requests one after another; tokens/s counts the generated
tokens (the usage each answer reports) over the wall time of all of them, prefill and vision
encoder included. The two ways alternate ``--rounds`` times in the order WebSocket, API, API,
WebSocket, so that a drift of the machine's speed falls on both alike. TTFT is send → first
text.

How to read it
--------------
``ratio`` is the API's mean tokens/s over the WebSocket's: the cost of the HTTP layer to the
batching, ≥ 0.95 meaning it costs the engine's batching gain nothing that matters. Absolute
figures are this machine's.

Example::

    python loadtest/openai_bench.py                       # mid size, 16 streams, ~2 minutes
    python loadtest/openai_bench.py --client openai --json /tmp/openai.json
    python loadtest/openai_bench.py --size real --max-tokens 256 -- --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES, cpu_name, log, parse_metrics, spawn_server, split_server_args

#: Prompt tokens of one request (256 image tokens and the prompt's text), with room to spare.
PROMPT_ROOM = 300


def load_images(n: int) -> list[bytes]:
    """``ocr_bench.py``'s inputs as PNG: the fixture crops, then synthetic pages."""
    from ragws.testing.got_tiny import synthetic_images

    images = [
        Image.open(path).convert("RGB")
        for name in ("table1.png", "table2.png", "title.png")
        if (path := FIXTURES / name).is_file()
    ]
    images += synthetic_images(max(0, n - len(images)), seed=7)
    encoded = []
    for image in images[:n]:
        out = io.BytesIO()
        image.save(out, format="PNG")
        encoded.append(out.getvalue())
    return encoded


def checkpoint(args: argparse.Namespace) -> Path:
    """``--model``, or the random-weight GOT-OCR2 of ``--size``, built once and reused."""
    if args.model is not None:
        return args.model
    folder = Path(tempfile.gettempdir()) / f"ragws-got-{args.size}"
    if not (folder / "config.json").is_file():
        log(f"building a random-weight GOT-OCR2 ({args.size}) in {folder}")
        command = [sys.executable, "-m", "ragws.testing.got_tiny", str(folder)]
        subprocess.run([*command, "--size", args.size], check=True, capture_output=True)
    return folder


async def scrape(http: aiohttp.ClientSession, http_url: str) -> dict[str, float]:
    async with http.get(http_url + "/metrics") as resp:
        return parse_metrics(await resp.text())


class Run:
    """The counts of one way's run."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ttft: list[float] = []


async def ws_request(ws: aiohttp.ClientWebSocketResponse, frame: bytes, run: Run) -> None:
    sent = time.perf_counter()
    await ws.send_bytes(frame)
    first = True
    while True:
        message = msgpack.unpackb((await ws.receive()).data)
        if message["type"] == "token" and first:
            run.ttft.append(time.perf_counter() - sent)
            first = False
        elif message["type"] == "done":
            run.tokens += message["usage"]["completion_tokens"]
            return
        elif message["type"] == "error":
            raise RuntimeError(message["message"])


async def sse_request(http: aiohttp.ClientSession, url: str, body: bytes, run: Run) -> None:
    """One streamed chat completion, read as Server-Sent Events line by line."""
    sent = time.perf_counter()
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {await resp.text()}")
        first = True
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data:") :])
            if chunk.get("usage"):
                run.tokens += chunk["usage"]["completion_tokens"]
            elif first and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                run.ttft.append(time.perf_counter() - sent)
                first = False


async def openai_request(client: Any, payload: dict[str, Any], run: Run) -> None:
    """One streamed chat completion through the official ``openai`` client."""
    sent = time.perf_counter()
    extra = {k: v for k, v in payload.items() if k == "ignore_eos"}
    fields = {k: v for k, v in payload.items() if k != "ignore_eos"}
    stream = await client.chat.completions.create(**fields, extra_body=extra)
    first = True
    async for chunk in stream:
        if chunk.usage is not None:
            run.tokens += chunk.usage.completion_tokens
        elif first and chunk.choices and chunk.choices[0].delta.content:
            run.ttft.append(time.perf_counter() - sent)
            first = False


async def measure(
    streams: int, requests: int, one: Callable[[int, Run], Awaitable[None]]
) -> dict[str, float]:
    """``streams`` clients, each sending ``requests`` requests one after another."""
    run = Run()

    async def client(c: int) -> None:
        for r in range(requests):
            await one(c * requests + r, run)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(streams)))
    elapsed = time.perf_counter() - started
    ttft = sorted(run.ttft)
    return {
        "tokens": run.tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": run.tokens / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
    }


async def bench(args: argparse.Namespace, http_url: str, model: str) -> dict[str, Any]:
    images = load_images(args.streams * args.requests)
    frames = [
        msgpack.packb(
            {
                "type": "ocr",
                "id": i,
                "image": image,
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
            }
        )
        for i, image in enumerate(images)
    ]
    payloads = [
        {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "data:image/png;base64," + base64.b64encode(image).decode()
                            },
                        }
                    ],
                }
            ],
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        for image in images
    ]
    bodies = [json.dumps(p).encode() for p in payloads]
    chat_url = http_url + "/v1/chat/completions"
    ws_url = http_url.replace("http://", "ws://") + "/ws"
    client = None
    if args.client == "openai":
        import openai

        client = openai.AsyncOpenAI(base_url=http_url + "/v1", api_key="-", max_retries=0)

    async with aiohttp.ClientSession() as http:
        sockets: dict[int, aiohttp.ClientWebSocketResponse] = {}

        async def over_ws(i: int, run: Run) -> None:
            # A socket per client, opened with its first request: a socket left idle while
            # the other way runs would miss the server's heartbeat pings.
            client = i // args.requests
            if client not in sockets or sockets[client].closed:
                sockets[client] = await http.ws_connect(ws_url, max_msg_size=0)
                await sockets[client].receive()  # hello
            await ws_request(sockets[client], frames[i], run)

        async def over_api(i: int, run: Run) -> None:
            if client is not None:
                await openai_request(client, payloads[i], run)
            else:
                await sse_request(http, chat_url, bodies[i], run)

        ways = {"websocket": over_ws, "openai_api": over_api}
        for way in ways.values():  # warm-up: first calls are slow
            await measure(1, 1, way)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name in ("websocket", "openai_api", "openai_api", "websocket"):
                before = await scrape(http, http_url)
                result = await measure(args.streams, args.requests, ways[name])
                after = await scrape(http, http_url)
                steps = after["ragws_ocr_batch_size_count"] - before["ragws_ocr_batch_size_count"]
                rows = after["ragws_ocr_batch_size_sum"] - before["ragws_ocr_batch_size_sum"]
                result["mean_batch"] = rows / max(steps, 1)
                result["steps"] = steps
                # The server's CPU per token: what the transport costs, however busy the
                # machine is with other work (wall-clock tokens/s is not).
                cpu = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
                result["server_cpu_ms_per_token"] = 1000 * cpu / max(result["tokens"], 1)
                log(
                    f"{name}: {result['tokens_per_s']:.1f} tok/s ({result['seconds']:.1f} s, "
                    f"{steps:.0f} steps, mean batch {result['mean_batch']:.1f}, server CPU "
                    f"{result['server_cpu_ms_per_token']:.1f} ms/token)"
                )
                runs[name].append(result)
                for ws in sockets.values():
                    await ws.close()
                sockets.clear()
    if client is not None:
        await client.close()
    summary = {name: statistics.mean(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    cpu = {
        name: statistics.mean(r["server_cpu_ms_per_token"] for r in rs) for name, rs in runs.items()
    }
    return {
        "runs": runs,
        "tokens_per_s": summary,
        "ratio": summary["openai_api"] / summary["websocket"],
        "server_cpu_ms_per_token": cpu,
        "cpu_ratio": cpu["openai_api"] / cpu["websocket"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    own, serve_flags = split_server_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to `ragws serve`, e.g. -- --device cuda",
    )
    parser.add_argument("--size", default="mid", choices=("tiny", "mid", "real"))
    parser.add_argument("--model", type=Path, help="a GOT-OCR2 directory instead")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="WS, API, API, WS per round")
    parser.add_argument("--client", choices=("aiohttp", "openai"), default="aiohttp")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "openai_bench")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(own)
    if min(args.streams, args.requests, args.max_tokens, args.rounds) < 1:
        raise SystemExit("--streams, --requests, --max-tokens and --rounds must be positive")

    model = checkpoint(args)
    flags = [
        "--ocr-model",
        str(model),
        "--ocr-batch-size",
        str(args.streams),
        "--max-model-len",
        str(PROMPT_ROOM + args.max_tokens),
        "--max-concurrent",
        str(4 * args.streams),
        "--log-level",
        "warning",
        *serve_flags,
    ]
    with spawn_server(flags, args.out / "server.log") as server:
        result = asyncio.run(bench(args, server.target.http_url, model.name))

    machine = cpu_name()
    print(
        f"\nGOT-OCR2 {args.model or args.size} (random weights), {args.streams} streams, "
        f"{args.requests} requests each, {args.max_tokens} tokens/request, {machine}, "
        f"API client: {args.client}"
    )
    print(f"{'way':<12}{'tok/s (runs)':>36}{'mean':>9}{'TTFT p50':>10}{'server CPU/token':>18}")
    for name, runs in result["runs"].items():
        each = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs)
        ttft = statistics.median(r["ttft_p50_ms"] for r in runs)
        mean = result["tokens_per_s"][name]
        cpu = result["server_cpu_ms_per_token"][name]
        print(f"{name:<12}{each:>36}{mean:>9.1f}{ttft:>8.0f}ms{cpu:>15.1f} ms")
    print(f"tokens/s ratio (OpenAI API / WebSocket): {result['ratio']:.3f}")
    print(f"server CPU per token ratio (OpenAI API / WebSocket): {result['cpu_ratio']:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "model": str(args.model or args.size),
                    "streams": args.streams,
                    "requests_per_client": args.requests,
                    "max_tokens": args.max_tokens,
                    "client": args.client,
                    **result,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
