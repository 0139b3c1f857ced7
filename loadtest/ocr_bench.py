"""OCR throughput: the continuous-batching engine behind WebSockets vs. transformers' generate.

What it measures
----------------
A random-weight GOT-OCR2 of the real architecture (``--size mid`` by default: Qwen2 text
decoder 512 hidden × 8 layers, vocab ~32k, a small windowed vision tower at 1024 px; ``real``
is the published size, for GPUs) answers the same OCR requests three ways, in one run on one
machine:

* **HF sequential** — ``model.generate(do_sample=False)`` on one image at a time;
* **HF static batch** — one ``generate`` call on a batch of ``--batch`` images (all prompts have
  the same length, so there is no padding);
* **ragws** — the server on loopback, loading the checkpoint from ``--ocr-model`` exactly as
  ``ragws serve`` does, with C concurrent WebSocket clients, each streaming one request at a
  time, for C in ``--streams`` (default 1, 4, 16).

The checkpoint is built and the transformers runs go in a child process of their own, so that
the server's process holds one OpenMP team, its engine's, as a deployment's does
(``ragws.runtime.threads``).

Every request uses ``ignore_eos`` and the same ``--max-tokens``, so every way generates the same
number of tokens. Tokens/s counts generated tokens over wall time, prefill (vision encoder
included) and all. TTFT is send → first ``token`` frame.

How to read it
--------------
Ratios (``vs HF seq``, ``vs HF batch``) compare runs made side by side and carry across
machines; absolute tokens/s are only this machine's. The static batch is the upper bound of
what batching without scheduling gets: every sequence starts and ends together, which real
traffic never does. The server's value is matching it while requests come and go.

``--rounds N`` alternates the static batch and the most streams N times (HF first, then
ragws, then ragws, then HF, ...) and reports the medians: on a shared machine the drift between
minutes is as large as the differences measured.

``--arch`` picks the family: ``got_ocr2`` (default), ``qwen2_vl`` (MinerU2.5's architecture),
``qwen2_5_vl`` (olmOCR-2's) or ``paddleocr_vl``, each a random-weight checkpoint of the real
architecture (``mid``: a 512-wide, 8-layer decoder; images resized to 448 × 448, 256 image
tokens, so that the static batch needs no padding), asked its default task through its own chat
template. ``--prefill-budgets 256,100000`` adds TTFT at 16 simultaneous arrivals with chunked
prefill (a small per-step budget: prompts prefilled over several steps, running streams keep
decoding) against whole prefills (a budget no prompt reaches).

Example::

    python loadtest/ocr_bench.py                      # mid size, 256 tokens, 1/4/16 streams
    python loadtest/ocr_bench.py --arch qwen2_vl --prefill-budgets 256,100000
    python loadtest/ocr_bench.py --size real --device cuda --max-tokens 256 --json gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp
import msgpack
import torch
from aiohttp import web
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES, cpu_name, log

from ragws.bootstrap import create_app
from ragws.config import Settings
from ragws.testing.got_tiny import build_got_ocr2, synthetic_images

ARCHS = ("got_ocr2", "qwen2_vl", "qwen2_5_vl", "paddleocr_vl")
#: The VLMs' images: one size, so every prompt has the same length (a static batch unpadded).
VLM_IMAGE_SIDE = 448


def build_model(arch: str, out_dir: Path, size: str) -> Path:
    """A random-weight checkpoint of ``arch`` at ``size``, as ``ragws serve`` loads one."""
    if arch == "got_ocr2":
        return build_got_ocr2(out_dir, size)
    if size == "real":
        raise SystemExit(f"--size real: pass a {arch} checkpoint directory as --model")
    if arch == "paddleocr_vl":
        from ragws.testing.paddleocr_vl_tiny import build_tiny_paddleocr_vl

        return build_tiny_paddleocr_vl(out_dir, size=size, eos_mode="never")
    from ragws.testing.qwen2_vl_tiny import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(out_dir, arch, size=size, eos_mode="never")


def vlm_messages(arch: str, image: Image.Image) -> list[dict]:
    """The request the server sends for the checkpoint's default task (``mode`` format)."""
    if arch == "paddleocr_vl":
        from ragws.models.paddleocr_vl import DEFAULT_MODE, MODES

        content = [{"type": "image", "image": image}, {"type": "text", "text": MODES[DEFAULT_MODE]}]
        return [{"role": "user", "content": content}]
    from ragws.models.qwen2_vl import DEFAULT_MODES, MODES, SYSTEM_PROMPT
    from ragws.testing.qwen2_vl_tiny import ARCHITECTURES

    task = MODES[DEFAULT_MODES[ARCHITECTURES[arch]]]
    content = [{"type": "image", "image": image}, {"type": "text", "text": task.instruction}]
    if task.text_first:
        content.reverse()
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def load_images(n: int) -> list[Image.Image]:
    """The fixture crops (real table and title images), then synthetic pages up to ``n``."""
    images = [
        Image.open(path).convert("RGB")
        for name in ("table1.png", "table2.png", "title.png")
        if (path := FIXTURES / name).is_file()
    ]
    images += synthetic_images(max(0, n - len(images)), seed=7)
    return [images[i % len(images)] for i in range(n)]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def hf_runs(
    arch: str,
    model_dir: Path,
    images: list[Image.Image],
    max_tokens: int,
    batch: int,
    sequential: int,
    device: str,
) -> dict[str, float]:
    """HF ``generate`` over ``sequential`` requests one at a time (0: none), then over one
    static batch of ``batch``: tokens/s of each."""
    import transformers

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = json.loads((model_dir / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    model = model_class.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)

    def inputs_of(batch_images: list[Image.Image]) -> dict:
        if arch == "got_ocr2":
            return processor(images=batch_images, format=True, return_tensors="pt")
        each = [
            processor.apply_chat_template(
                vlm_messages(arch, image),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
            for image in batch_images
        ]
        # Equal-sized images: equal-length prompts, stacked without padding.
        return {key: torch.cat([e[key] for e in each]) for key in each[0]}

    def generate(batch_images: list[Image.Image]) -> int:
        inputs = {k: v.to(device) for k, v in inputs_of(batch_images).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,  # the HF side of ignore_eos
            )
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    generate(images[:1])  # warm-up
    seq = 0.0
    if sequential:
        t0 = time.perf_counter()
        tokens = sum(generate([image]) for image in images[:sequential])
        seq = tokens / (time.perf_counter() - t0)
        log(f"HF sequential: {seq:.1f} tok/s over {sequential} requests")
    t0 = time.perf_counter()
    tokens = generate(images[:batch])
    static = tokens / (time.perf_counter() - t0)
    log(f"HF static batch of {batch}: {static:.1f} tok/s")
    return {"hf_sequential": seq, "hf_static_batch": static}


async def server_run(
    url: str, images: list[Image.Image], streams: int, requests: int, max_tokens: int
) -> dict[str, float]:
    frames = [
        msgpack.packb(
            {
                "type": "ocr",
                "id": i,
                "image": png(images[i % len(images)]),
                "max_tokens": max_tokens,
                "ignore_eos": True,
            }
        )
        for i in range(requests)
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    ttft: list[float] = []
    tokens = 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal tokens
        async with http.ws_connect(url, max_msg_size=0) as ws:
            await ws.receive()  # hello
            while not queue.empty():
                i = queue.get_nowait()
                sent = time.perf_counter()
                await ws.send_bytes(frames[i])
                first = True
                while True:
                    frame = msgpack.unpackb((await ws.receive()).data)
                    if frame["type"] == "token" and first:
                        ttft.append(time.perf_counter() - sent)
                        first = False
                    elif frame["type"] == "done":
                        tokens += frame["usage"]["completion_tokens"]
                        break
                    elif frame["type"] == "error":
                        raise RuntimeError(frame["message"])

    async with aiohttp.ClientSession() as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(streams)))
        elapsed = time.perf_counter() - t0
    ttft.sort()
    return {
        "streams": streams,
        "requests": requests,
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
    }


async def run_server(
    args: argparse.Namespace,
    model_dir: Path,
    images: list[Image.Image],
    streams: list[int],
    prefill_budget: int | None = None,
) -> list:
    prompt_room = (300 if args.arch == "got_ocr2" else 800) * (args.crop_tiles or 1)
    budget = {} if prefill_budget is None else {"ocr_max_prefill_tokens": prefill_budget}
    settings = Settings(
        port=0,
        device=args.device,
        ocr_model=str(model_dir),
        ocr_batch_size=max(streams),
        max_model_len=prompt_room + args.max_tokens + 16,
        layout_preferred_batch_size="1",
        **budget,
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"ws://127.0.0.1:{port}/ws"
    results = []
    try:
        await server_run(url, images, 1, 1, 4)  # warm-up
        for count in streams:
            requests = max(count, args.sequential) if count == 1 else count
            result = await server_run(url, images, count, requests, args.max_tokens)
            log(f"ragws, {count} streams: {result['tokens_per_s']:.1f} tok/s")
            results.append(result)
    finally:
        await runner.cleanup()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="got_ocr2", choices=ARCHS)
    parser.add_argument("--size", default="mid", choices=("tiny", "mid", "real"))
    parser.add_argument("--model", type=Path, help="use this checkpoint directory instead")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="HF static batch size")
    parser.add_argument("--sequential", type=int, default=4, help="HF sequential requests")
    parser.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--crop-tiles", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--prefill-budgets",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[],
        help="also TTFT at 16 simultaneous arrivals under each ocr_max_prefill_tokens",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate the static batch and the most streams this many times (medians)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        images = load_images(max(args.batch, max(args.streams)))
        if args.arch != "got_ocr2":
            images = [im.resize((VLM_IMAGE_SIDE, VLM_IMAGE_SIDE)) for im in images]
        # Building the checkpoint and the transformers runs go in a process of their own, as a
        # separate deployment would: torch's OpenMP team in this process is then the server
        # engine's alone (a thread that had run torch ops here would slow every decode step).
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            model_dir = (
                args.model
                or pool.submit(build_model, args.arch, Path(tmp) / args.size, args.size).result()
            )

            def hf_side(sequential: int) -> dict[str, float]:
                return pool.submit(
                    hf_runs,
                    args.arch,
                    model_dir,
                    images,
                    args.max_tokens,
                    args.batch,
                    sequential,
                    args.device,
                ).result()

            most = max(args.streams)
            fewer = [n for n in args.streams if n != most]
            served = asyncio.run(run_server(args, model_dir, images, fewer)) if fewer else []
            # The static batch and the most streams alternate (HF first in even rounds), so
            # that the machine's drift falls on both alike; the medians are reported.
            statics, sequentials, busiest = [], [], []
            for round_ in range(args.rounds):
                for side in ("hf", "ragws") if round_ % 2 == 0 else ("ragws", "hf"):
                    if side == "hf":
                        result = hf_side(args.sequential if round_ == 0 else 0)
                        statics.append(result["hf_static_batch"])
                        if round_ == 0:
                            sequentials.append(result["hf_sequential"])
                    else:
                        busiest += asyncio.run(run_server(args, model_dir, images, [most]))
        hf = {
            "hf_sequential": statistics.median(sequentials),
            "hf_static_batch": statistics.median(statics),
        }
        served.append(
            {
                "streams": most,
                "requests": busiest[0]["requests"],
                **{
                    key: statistics.median(r[key] for r in busiest)
                    for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms")
                },
                "rounds": [r["tokens_per_s"] for r in busiest],
                "static_rounds": statics,
            }
        )
        prefill = []
        for budget in args.prefill_budgets:
            (result,) = asyncio.run(run_server(args, model_dir, images, [16], budget))
            log(f"16 arrivals, prefill budget {budget}: TTFT p50 {result['ttft_p50_ms']:.0f} ms")
            prefill.append({"prefill_budget": budget, **result})

    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"\n{args.arch} {args.size} (random weights), {args.max_tokens} tokens/request, {device}")
    print(f"{'run':<22}{'tok/s':>9}{'vs HF seq':>11}{'vs HF batch':>13}{'TTFT p50':>10}{'p95':>9}")
    print(f"{'HF sequential':<22}{hf['hf_sequential']:>9.1f}{1.0:>11.2f}")
    print(f"{f'HF static batch {args.batch}':<22}{hf['hf_static_batch']:>9.1f}")
    for r in served:
        print(
            f"{'ragws ' + str(r['streams']) + ' streams':<22}{r['tokens_per_s']:>9.1f}"
            f"{r['tokens_per_s'] / hf['hf_sequential']:>11.2f}"
            f"{r['tokens_per_s'] / hf['hf_static_batch']:>13.2f}"
            f"{r['ttft_p50_ms']:>8.0f}ms{r['ttft_p95_ms']:>7.0f}ms"
        )
    for r in prefill:
        print(
            f"{'16 arrivals, budget ' + str(r['prefill_budget']):<22}{r['tokens_per_s']:>9.1f}"
            f"{'':>24}{r['ttft_p50_ms']:>8.0f}ms{r['ttft_p95_ms']:>7.0f}ms"
        )
    if args.json:
        result = {"arch": args.arch, "size": args.size, "device": device, **hf, "ragws": served}
        args.json.write_text(json.dumps({**result, "prefill": prefill}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
