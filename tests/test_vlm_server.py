"""An element-level VLM behind the server: Qwen2-VL, MinerU2.5's architecture, random weights,
loaded from ``--ocr-model DIR`` as ``ragws serve`` loads it. Its tasks in ``hello`` and
``/health``, ``ocr`` requests with a task and with a prompt of their own, and ``parse`` reading
each region with its type's task: every text equals the model's own ``generate`` alone."""

from __future__ import annotations

import io

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

from ragws.models.qwen2_vl import MODES, SYSTEM_PROMPT

from .conftest import render_rgb
from .documents import TABLES_PAGE

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(qwen2_vl_tiny_dir):
    """``generate(do_sample=False)`` alone on one image with one instruction."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(qwen2_vl_tiny_dir)
    tok = processor.tokenizer
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def run(rgb: np.ndarray, instruction: str, max_tokens: int = MAX_TOKENS) -> str:
        content = [
            {"type": "image", "image": Image.fromarray(rgb)},
            {"type": "text", "text": instruction},
        ]
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_tokens,
                eos_token_id=stop,
                pad_token_id=tok.pad_token_id,
            )
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        return tok.decode(ids, skip_special_tokens=True)

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
