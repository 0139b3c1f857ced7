"""An element-level VLM behind the server: Qwen2-VL, MinerU2.5's architecture, random weights,
loaded from ``--ocr-model DIR`` as ``ragws serve`` loads it. Its tasks in ``hello`` and
``/health``, ``ocr`` requests with a task and with a prompt of their own, and ``parse`` reading
each region with its type's task: every text equals the model's own ``generate`` alone."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from ragws.client import AsyncClient
from ragws.models.qwen2_vl import MODES

from .conftest import render_rgb
from .documents import TABLES_PAGE
from .reference import generate_alone, vlm_chat

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(qwen2_vl_tiny_dir):
    """``generate(do_sample=False)`` alone on one image with one instruction."""
    return solo_text(qwen2_vl_tiny_dir, mode="text")


def solo_text(model_dir: Path, mode: str = "format") -> Callable[..., str]:
    """The text of ``generate(do_sample=False)`` alone on one image, with the checkpoint's
    ``mode`` task (default: its default task) or an instruction of the call's own:
    ``run(rgb, instruction=None, max_tokens=MAX_TOKENS)``."""
    import json

    import transformers
    from transformers import AutoProcessor

    architecture = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    def run(rgb: np.ndarray, instruction: str | None = None, max_tokens: int = MAX_TOKENS) -> str:
        messages = vlm_chat(architecture, rgb, mode, instruction)
        _, ids = generate_alone(model, processor, messages, max_tokens)
        return processor.tokenizer.decode(ids, skip_special_tokens=True)

    return run


async def vlm_server(start_server, model_dir, **overrides):
    settings = {"ocr_model": str(model_dir), "ocr_batch_size": 3, "max_model_len": 512}
    return await start_server(**{**settings, "ocr_max_tokens": MAX_TOKENS, **overrides})


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


async def test_hello_and_health_name_the_architecture_and_its_tasks(
    start_server, connect, qwen2_vl_tiny_dir
):
    server = await vlm_server(start_server, qwen2_vl_tiny_dir)
    _, hello = await connect(server)
    assert hello["models"]["ocr"] == qwen2_vl_tiny_dir.name
    assert hello["ocr"]["architecture"] == "Qwen2VLForConditionalGeneration"
    assert hello["ocr"]["markup"] is True
    assert set(hello["ocr"]["modes"]) == {"format", "plain", *MODES}
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/health") as response:
        health = await response.json()
    assert health["ocr"]["architecture"] == "Qwen2VLForConditionalGeneration"
    assert health["ocr"]["modes"] == hello["ocr"]["modes"]
    assert health["ocr"]["kv_slots"] == 3 and health["ocr"]["max_model_len"] == 512


async def test_an_ocr_request_takes_a_task_or_a_prompt_of_its_own(
    start_server, connect, qwen2_vl_tiny_dir, reference, paper
):
    server = await vlm_server(start_server, qwen2_vl_tiny_dir)
    client, _ = await connect(server)
    table = np.asarray(Image.open(io.BytesIO(paper.crop_png(TABLES_PAGE, paper.tables[0]))))
    table = np.ascontiguousarray(table[..., :3])
    sent = {
        "t": {"mode": "table"},
        "f": {"mode": "formula"},
        "p": {"mode": "table", "prompt": "Read it aloud:"},
        "d": {},  # format: the checkpoint's default task, text
    }
    for request_id, fields in sent.items():
        await client.send({"type": "ocr", "id": request_id, "image": png(table), **fields})
    results = await client.finish(*sent)
    for request_id, fields in sent.items():
        done = results[request_id][-1]
        assert done["type"] == "done", done
        instruction = fields.get("prompt") or MODES[fields.get("mode", "text")].instruction
        assert done["text"] == reference(table, instruction), request_id
    # The Python client sends a task and a prompt of its own as the frame does.
    async with AsyncClient.connect(server.ws_url) as python_client:
        assert python_client.hello.ocr_architecture == "Qwen2VLForConditionalGeneration"
        text = await python_client.ocr_text(png(table), mode="table", prompt="Read it aloud:")
        assert text == reference(table, "Read it aloud:")
    await client.send({"type": "ocr", "id": "x", "image": png(table), "mode": "chart"})
    error = await client.until("x", "error")
    assert error["code"] == "bad_request" and "formula" in error["message"], error
    await client.send({"type": "ocr", "id": "y", "image": png(table), "prompt": ""})
    error = await client.until("y", "error")
    assert error["code"] == "bad_request" and "prompt" in error["message"], error


async def test_parse_reads_each_region_with_its_types_task(
    start_server, connect, qwen2_vl_tiny_dir, reference, paper_pdf, monkeypatch
):
    """Tables are read with the table task, everything else with the text task, every region
    its own sequence in the running batch; each text is the model's own on that crop."""
    from ragws.serving.services import SERVICES

    server = await vlm_server(start_server, qwen2_vl_tiny_dir)
    ocr = server.app[SERVICES].ocr
    calls: list[tuple[str, tuple[float, float, float, float]]] = []
    generate = ocr.generate

    def spy(image, options):
        calls.append((options.mode, options.box))
        return generate(image, options)

    monkeypatch.setattr(ocr, "generate", spy)
    client, _ = await connect(server)
    page = render_rgb(paper_pdf, TABLES_PAGE, scale=2.0)
    request = {"type": "parse", "id": "o", "pdf": paper_pdf, "pages": [TABLES_PAGE], "text": "ocr"}
    await client.send(request)
    frames = (await client.finish("o"))["o"]
    assert frames[-1]["type"] == "done", frames[-1]
    blocks = frames[0]["blocks"]
    tables = [b for b in blocks if b["type"] == "table"]
    assert len(tables) == 2 and all(b["source"] == "ocr" for b in tables)
    modes = [mode for mode, _ in calls]
    assert modes.count("table") == 2 and set(modes) <= {"table", "formula", "text"}, modes
    for mode, box in calls:
        if mode != "table":
            continue
        x0, y0, x1, y1 = (round(v) for v in box)
        crop = page[max(0, y0) : y1, max(0, x0) : x1]
        expected = reference(crop, MODES["table"].instruction).strip()
        assert any(t["text"] == expected for t in tables), (expected, [t["text"] for t in tables])


# --- each family behind the server: cancel and socket close ------------------------------------

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "paddleocr_vl")


@pytest.mark.parametrize("arch", FAMILIES)
async def test_cancel_and_socket_close_free_each_familys_slots(
    arch, request, start_server, connect
):
    """A cancel, then a closed socket, end a client's running sequences of each family: their
    KV slots come back, and another client's request beside them still reads exactly what the
    model says alone."""
    from ragws.testing.got_tiny import synthetic_images

    from .test_ocr_server import wait_metric

    model_dir = request.getfixturevalue(f"{arch}_tiny_dir")
    # Room for thousands of tokens: the leaver's sequences outlast the test's steps.
    server = await vlm_server(start_server, model_dir, ocr_max_tokens=4000, max_model_len=4096)
    images = [np.asarray(image) for image in synthetic_images(3, seed=11)]
    leaver, _ = await connect(server)
    stayer, _ = await connect(server)
    for rid, image in ((1, images[0]), (2, images[1])):
        await leaver.send(
            {"type": "ocr", "id": rid, "image": png(image), "max_tokens": 4000, "ignore_eos": True}
        )
    await stayer.send({"type": "ocr", "id": 9, "image": png(images[2]), "max_tokens": 20})
    await leaver.until(1, "token")
    await leaver.until(2, "token")
    used = await server.metric("ragws_kv_slots_used")
    assert used >= 2, f"{used} KV slots in use with both of the leaver's sequences running"
    await leaver.send({"type": "cancel", "id": 1})
    assert (await leaver.until(1, "done"))["finish_reason"] == "cancelled"
    await leaver.until(2, "token")  # still running
    await leaver.ws.close()
    done = await stayer.until(9, "done")
    await wait_metric(server, "ragws_kv_slots_used", 0)
    await wait_metric(server, "ragws_ocr_running", 0)
    cancelled = {"type": "ocr", "outcome": "cancelled"}
    assert await server.metric("ragws_requests_total", cancelled) == 2
    assert done["type"] == "done", done
    assert done["text"] == solo_text(model_dir)(images[2], max_tokens=20), done


async def test_a_page_level_model_reads_a_scan_whole(
    start_server, connect, qwen2_5_vl_tiny_dir, paper_pdf, monkeypatch
):
    """Qwen2.5-VL (olmOCR-2's architecture) is page-level: a page without a text layer is one
    sequence, the whole page with the page task, and its blocks are that answer's markdown; a
    born-digital page keeps its text layer."""
    from ragws.pipeline.markdown import page_markdown
    from ragws.pipeline.vlm_pages import page_blocks
    from ragws.serving.services import SERVICES
    from ragws.testing.got_tiny import synthetic_images

    server = await vlm_server(start_server, qwen2_5_vl_tiny_dir)
    ocr = server.app[SERVICES].ocr
    calls: list[tuple[np.ndarray, str, tuple[float, float, float, float] | None]] = []
    generate = ocr.generate

    def spy(image, options):
        calls.append((image, options.mode, options.box))
        return generate(image, options)

    monkeypatch.setattr(ocr, "generate", spy)
    client, hello = await connect(server)
    assert hello["ocr"]["page_mode"] == "page"
    scan = np.asarray(synthetic_images(1, seed=21)[0])
    await client.send({"type": "parse", "id": "s", "image": png(scan), "figures": True})
    frames = (await client.finish("s"))["s"]
    assert frames[-1]["type"] == "done", frames[-1]
    (image, mode, box), *others = calls
    assert not others and mode == "page"
    height, width = image.shape[:2]
    assert box == (0.0, 0.0, float(width), float(height))
    answer = solo_text(qwen2_5_vl_tiny_dir)(image)
    expected = page_blocks(answer, 0, width, height)
    assert expected, f"the model said nothing on this page: {answer!r}"
    page = frames[0]
    assert page["markdown"] == page_markdown(expected)
    assert [b["type"] for b in page["blocks"]] == [b.type for b in expected]
    assert all(b["source"] == "ocr" for b in page["blocks"])
    assert not any(b.get("image") for b in page["blocks"])  # no crop without geometry

    calls.clear()
    await client.send({"type": "parse", "id": "d", "pdf": paper_pdf, "pages": [0]})
    frames = (await client.finish("d"))["d"]
    assert frames[-1]["type"] == "done", frames[-1]
    assert frames[0]["source"] in ("pdf", "mixed")
    # Regions without a text layer, if any, are read with the page task, never the page whole.
    assert all(mode == "page" and box is not None for _, mode, box in calls)
