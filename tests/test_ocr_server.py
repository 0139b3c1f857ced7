"""GOT-OCR2 through the server: continuous batching, streaming, cancellation and slots.

The model is a tiny random-weight GOT-OCR2 of the real architecture, saved with
save_pretrained and loaded by the server from --ocr-model exactly like a real checkpoint.
References come from transformers' own ``generate`` run alone on each input.
"""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from ragws.testing.got_tiny import synthetic_images  # noqa: E402


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return synthetic_images(10, seed=3)


@pytest.fixture(scope="module")
def reference(got_tiny_dir):
    """``generate(do_sample=False)`` alone on one input: the answer every request must match."""
    from transformers import AutoProcessor, GotOcr2ForConditionalGeneration

    model = GotOcr2ForConditionalGeneration.from_pretrained(got_tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(got_tiny_dir)
    tok = processor.tokenizer
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def run(
        image: Image.Image, mode: str, max_tokens: int, box=None
    ) -> tuple[list[int], str, bool]:
        rgb = np.asarray(image.convert("RGB"))
        if box is not None:
            x0, y0, x1, y1 = box
            rgb = rgb[y0:y1, x0:x1]
        inputs = processor(
            images=Image.fromarray(rgb), format=mode == "format", return_tensors="pt"
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs, do_sample=False, max_new_tokens=max_tokens, eos_token_id=stop
            )
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        return ids, tok.decode(ids, skip_special_tokens=True), bool(ids) and ids[-1] in stop

    return run


async def ocr_server(start_server, got_tiny_dir, **overrides):
    """A server that loads the tiny checkpoint from --ocr-model, as ``ragws serve`` would."""
    settings = {"ocr_model": str(got_tiny_dir), "ocr_batch_size": 4, "max_model_len": 512}
    return await start_server(**{**settings, **overrides})


async def test_every_request_matches_generate_alone(
    start_server, connect, got_tiny_dir, images, reference
):
    server = await ocr_server(start_server, got_tiny_dir, ocr_batch_size=3)
    client, hello = await connect(server)
    assert hello["models"]["ocr"] == got_tiny_dir.name
    cases = {
        i: {
            "image": images[i],
            "mode": "format" if i % 2 else "plain",
            "max_tokens": 6 + 3 * i,
            "box": (8, 8, 120, 100) if i in (2, 5) else None,
        }
        for i in range(9)
    }

    async def send(i, case):
        await asyncio.sleep(0.05 * i)  # staggered: later requests join a running batch
        frame = {"type": "ocr", "id": i, "image": png(case["image"]), "mode": case["mode"]}
        frame["max_tokens"] = case["max_tokens"]
        if case["box"] is not None:
            frame["box"] = list(case["box"])
        await client.send(frame)

    # A long stream runs throughout, so every request joins a running batch however fast the
    # tiny model finishes the short ones (their image preparation can outlast their decoding).
    await client.send(long_request("bg", images[0], max_tokens=400))
    sender = asyncio.gather(*(send(i, case) for i, case in cases.items()))
    frames = await client.finish(*cases, "bg")
    await sender
    assert frames["bg"][-1]["finish_reason"] == "length"
    reasons = set()
    for i, case in cases.items():
        *tokens, done = frames[i]
        assert done["type"] == "done", done
        assert all(f["type"] == "token" and f["text"] for f in tokens)
        ids, text, stopped = reference(case["image"], case["mode"], case["max_tokens"], case["box"])
        assert done["text"] == text, i
        assert "".join(f["text"] for f in tokens) == done["text"]
        assert done["usage"]["completion_tokens"] == len(ids), i
        assert done["usage"]["prompt_tokens"] > 256  # the image tokens are part of the prompt
        assert done["finish_reason"] == ("stop" if stopped else "length"), i
        timing = done["timing"]
        assert timing["total_ms"] >= timing["ttft_ms"] >= timing["queue_ms"] >= 0
        reasons.add(done["finish_reason"])
    assert reasons == {"stop", "length"}  # the tiny model is built to give both
    steps = await server.metric("ragws_ocr_batch_size_count")
    assert await server.metric("ragws_ocr_batch_size_sum") > steps  # steps held > 1 sequence
    assert await server.metric("ragws_kv_slots_used") == 0
    assert await server.metric("ragws_kv_slots_total") == 3
    assert await server.metric("ragws_ocr_running") == 0


async def wait_metric(server, name, value, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await server.metric(name)) != value:
        assert loop.time() < deadline, f"{name} stayed {got}, expected {value}"
        await asyncio.sleep(0.01)


def long_request(rid, image, max_tokens=400):
    return {
        "type": "ocr",
        "id": rid,
        "image": png(image),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "mode": "plain",
    }


async def test_cancel_frees_the_slot_and_stops_tokens(start_server, connect, got_tiny_dir, images):
    server = await ocr_server(start_server, got_tiny_dir)
    client, _ = await connect(server)
    await client.send(long_request("a", images[0]))
    await client.send(long_request("b", images[1]))
    for rid in ("a", "b"):
        await client.until(rid, "token")
    assert await server.metric("ragws_kv_slots_used") == 2
    await client.send({"type": "cancel", "id": "a"})
    done = await client.until("a", "done")
    assert done["finish_reason"] == "cancelled"
    await wait_metric(server, "ragws_kv_slots_used", 1)
    assert await server.metric("ragws_ocr_running") == 1
    # "b" keeps streaming; "a" says nothing more.
    for _ in range(20):
        frame = await client.recv()
        assert frame["id"] == "b", frame
    await client.send({"type": "cancel", "id": "b"})
    await client.until("b", "done")
    await wait_metric(server, "ragws_kv_slots_used", 0)
    assert await server.metric("ragws_requests_total", {"type": "ocr", "outcome": "cancelled"}) == 2


async def test_socket_close_frees_its_slots_others_continue(
    start_server, connect, got_tiny_dir, images, reference
):
    server = await ocr_server(start_server, got_tiny_dir)
    leaver, _ = await connect(server)
    stayer, _ = await connect(server)
    await leaver.send(long_request(1, images[2]))
    await leaver.send(long_request(2, images[3]))
    await stayer.send({"type": "ocr", "id": 9, "image": png(images[4]), "max_tokens": 60})
    await leaver.until(1, "token")
    await leaver.until(2, "token")
    await leaver.ws.close()
    # Both of its sequences leave; the survivor's output is still exactly its solo output.
    tokens, done = [], None
    while done is None:
        frame = await stayer.until(9, "token", "done")
        if frame["type"] == "done":
            done = frame
        else:
            tokens.append(frame["text"])
    _, text, _ = reference(images[4], "format", 60)
    assert done["text"] == text == "".join(tokens)
    await wait_metric(server, "ragws_kv_slots_used", 0)
    await wait_metric(server, "ragws_ocr_running", 0)


async def test_over_max_concurrent_is_overloaded(start_server, connect, got_tiny_dir, images):
    server = await ocr_server(start_server, got_tiny_dir, max_concurrent=2, ocr_batch_size=1)
    client, _ = await connect(server)
    for rid in ("a", "b", "c"):
        await client.send(long_request(rid, images[0], max_tokens=50))
    frames = await client.finish("a", "b", "c")
    assert frames["c"][-1]["code"] == "overloaded"
    # One of "a" and "b" waits for the only slot and still completes after the other.
    assert [frames[rid][-1]["finish_reason"] for rid in "ab"] == ["length", "length"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"mode": "latex"}, "'mode'"),
        ({"max_tokens": 0}, "'max_tokens'"),
        ({"box": [10, 10, 5, 50]}, "'box'"),
        ({"box": [5000, 5000, 6000, 6000]}, "no pixels"),
        ({"crop": "yes"}, "'crop'"),
    ],
)
async def test_bad_ocr_requests(start_server, connect, got_tiny_dir, images, extra, needle):
    server = await ocr_server(start_server, got_tiny_dir)
    client, _ = await connect(server)
    await client.send({"type": "ocr", "id": 1, "image": png(images[0]), **extra})
    error = await client.until(1, "error", "done")
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert needle in error["message"]


def form(image: bytes, **fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("image", image, filename="page.png", content_type="image/png")
    for name, value in fields.items():
        data.add_field(name, value)
    return data


async def test_http_ocr_plain_and_sse(start_server, got_tiny_dir, images, reference):
    server = await ocr_server(start_server, got_tiny_dir)
    _, text, _ = reference(images[5], "plain", 30)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            server.url + "/ocr", data=form(png(images[5]), mode="plain", max_tokens="30")
        ) as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"result": text}
        async with http.post(
            server.url + "/ocr",
            data=form(png(images[5]), mode="plain", max_tokens="30", stream="true"),
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            body = (await resp.read()).decode()
        async with http.post(server.url + "/ocr", data=form(b"not an image")) as resp:
            assert resp.status == 400
    events = [block for block in body.split("\n\n") if block]
    tokens = [json.loads(e[len("data: ") :])["token"] for e in events if e.startswith("data: ")]
    assert "".join(tokens) == text
    assert events[-1].startswith("event: done")
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert done["usage"]["completion_tokens"] >= 1


async def test_sse_client_disconnect_cancels(start_server, got_tiny_dir, images):
    # Room for a stream far longer than the test: it is still decoding when the client leaves,
    # on however fast a machine, and what ends it can only be the disconnect.
    max_tokens = 1700
    server = await ocr_server(start_server, got_tiny_dir, max_model_len=2048)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            server.url + "/ocr",
            data=form(png(images[6]), max_tokens=str(max_tokens), stream="true", ignore_eos="true"),
        )
        await resp.content.readline()  # the stream has started
        # The engine sets its gauges after a step's tokens are out, so the first token can
        # arrive before the slot it holds is counted.
        await wait_metric(server, "ragws_kv_slots_used", 1)
        resp.close()  # drop the connection mid-stream
    await wait_metric(server, "ragws_kv_slots_used", 0)
    await wait_metric(server, "ragws_inflight_requests", 0)
    # It stopped there: far short of the tokens it asked for.
    assert await server.metric("ragws_ocr_generated_tokens_total") < max_tokens


async def test_kv_memory_budget_sizes_the_slots(start_server, connect, got_tiny_dir, images):
    text = json.loads((got_tiny_dir / "config.json").read_text())["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    per_slot = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 4 * 512
    budget_mb = 2.5 * per_slot / 2**20  # room for two slots and a half: two are made
    server = await ocr_server(
        start_server, got_tiny_dir, ocr_batch_size=8, ocr_kv_cache_mb=budget_mb
    )
    assert await server.metric("ragws_kv_slots_total") == 2
    async with aiohttp.ClientSession() as http, http.get(server.url + "/health") as resp:
        health = await resp.json()
    assert health["ocr"]["kv_slots"] == 2
    assert health["ocr"]["kv_cache_mib"] == pytest.approx(2 * per_slot / 2**20, abs=0.1)
    # Three requests on two slots: the third waits for a slot and still completes.
    client, _ = await connect(server)
    for rid in ("a", "b", "c"):
        await client.send(long_request(rid, images[0], max_tokens=6))
    frames = await client.finish("a", "b", "c")
    assert [frames[rid][-1]["finish_reason"] for rid in "abc"] == ["length"] * 3


async def test_parse_sends_regions_through_the_engine(
    start_server, connect, got_tiny_dir, reference, paper_pdf
):
    """With GOT-OCR2, parse OCRs each region of a page without text as its own sequence:
    tables in format mode, text in plain mode; each equals generate() alone on the region's
    crop. A born-digital page keeps its text layer, tables included (pymupdf's finder)."""
    from ragws.pipeline.structure import dehyphenate

    from .conftest import render_rgb
    from .documents import TABLES_PAGE

    server = await ocr_server(start_server, got_tiny_dir, ocr_max_tokens=24, ocr_batch_size=4)
    client, hello = await connect(server)
    assert hello["ocr"] == {
        "modes": ["format", "plain"],
        "markup": True,
        "architecture": "GotOcr2ForConditionalGeneration",
        "page_mode": None,
    }
    page = Image.fromarray(render_rgb(paper_pdf, TABLES_PAGE, scale=2.0))

    def expected(block, mode):
        box = [round(v) for v in block["bbox"]]
        box = [max(0, box[0]), max(0, box[1]), min(page.width, box[2]), min(page.height, box[3])]
        return reference(page, mode, 24, box=box)[1].strip()

    # auto: the text layer, tables included.
    await client.send({"type": "parse", "id": "a", "pdf": paper_pdf, "pages": [TABLES_PAGE]})
    frames = (await client.finish("a"))["a"]
    assert frames[-1]["type"] == "done", frames[-1]
    blocks = frames[0]["blocks"]
    tables = [b for b in blocks if b["type"] == "table"]
    assert len(tables) == 2 and all(b["source"] == "pdf" for b in tables)
    assert {b["source"] for b in blocks if b["type"] == "text"} == {"pdf"}
    # ocr: every region through the engine, tables in format mode, text in plain mode.
    request = {"type": "parse", "id": "o", "pdf": paper_pdf, "pages": [TABLES_PAGE], "text": "ocr"}
    await client.send(request)
    frames = (await client.finish("o"))["o"]
    blocks = frames[0]["blocks"]
    tables = [b for b in blocks if b["type"] == "table"]
    assert len(tables) == 2 and all(b["source"] == "ocr" for b in tables)
    for table in tables:
        assert table["text"] == expected(table, "format")
    texts = [b for b in blocks if b["type"] == "text"]
    assert len(texts) >= 3 and all(b["source"] == "ocr" for b in texts)
    for block in texts[:3]:
        assert block["text"] == " ".join(dehyphenate(expected(block, "plain")).split())
    assert await server.metric("ragws_kv_slots_used") == 0
