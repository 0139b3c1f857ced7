"""The OpenAI-compatible API, tested with the real clients against real servers on loopback.

The OCR model is the tiny random-weight GOT-OCR2 the other OCR tests use, loaded from
--ocr-model like a real checkpoint. Its text is noise; what is tested is that the clients'
calls succeed, that the content and usage are exactly what the WebSocket ``ocr`` request gives
for the same image and prompt, and that the serving guarantees (admission, cancellation,
deadlines, the API key, limits) hold on this path too.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from ragws.engine.detokenizer import IncrementalDetokenizer, StopStrings  # noqa: E402
from ragws.testing.got_tiny import synthetic_images  # noqa: E402

KIND = {"type": "chat_completions"}


def png(image: Image.Image, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    image.convert(mode).save(out, format="PNG")
    return out.getvalue()


def data_url(image: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(image).decode()}"


def user(image: bytes, text: str | None = None, *, text_first: bool = False) -> list[dict]:
    """One user message with an image part and, when given, a text part."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if text is not None:
        parts.insert(0 if text_first else 1, {"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [png(image) for image in synthetic_images(8, seed=3)]


async def got_server(start_server, got_tiny_dir, **overrides):
    settings = {"ocr_model": str(got_tiny_dir), "ocr_batch_size": 4, "max_model_len": 512}
    return await start_server(**{**settings, **overrides})


def sync_client(server, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "-"), **kwargs)


def async_client(server, **kwargs: Any) -> openai.AsyncOpenAI:
    key = kwargs.pop("api_key", "-")
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, **kwargs)


async def ws_ocr(connect, server, image: bytes, **fields: Any) -> dict[str, Any]:
    """The ``done`` frame of a WebSocket ``ocr`` request, its text checked against its tokens."""
    client, _ = await connect(server)
    await client.send({"type": "ocr", "id": 1, "image": image, **fields})
    *tokens, done = (await client.finish(1))[1]
    assert done["type"] == "done", done
    assert "".join(f["text"] for f in tokens) == done["text"]
    return done


def usage_of(done: dict[str, Any]) -> dict[str, int]:
    prompt, completion = done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total": prompt + completion}


def usage_dict(usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total": usage.total_tokens,
    }


async def metric(server, name: str, labels=None, api_key: str | None = None) -> float:
    """One sample from /metrics (as ``Server.metric`` reads it), with the API key if any."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = server.url + "/metrics"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if not line.startswith("#") and sample == name and got == want:
            return float(value)
    return 0.0


async def wait_metric(server, name, value, labels=None, timeout=10.0, api_key=None):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await metric(server, name, labels, api_key)) != value:
        assert loop.time() < deadline, f"{name} stayed {got}, expected {value}"
        await asyncio.sleep(0.01)


# --- the official clients --------------------------------------------------------------------


async def test_models_list_the_served_model(start_server, got_tiny_dir):
    server = await got_server(start_server, got_tiny_dir)
    client = sync_client(server)
    models = await asyncio.to_thread(client.models.list)
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [
        (got_tiny_dir.name, "model", "ragws")
    ]
    assert models.data[0].created > 0
    card = await asyncio.to_thread(client.models.retrieve, got_tiny_dir.name)
    assert card.id == got_tiny_dir.name
    with pytest.raises(openai.NotFoundError):
        await asyncio.to_thread(client.models.retrieve, "gpt-4o")


async def test_clients_get_the_websocket_result(
    start_server, connect, got_tiny_dir, images, caplog
):
    """Sync, async, streamed and raw calls: greedy content and usage are the ``ocr`` frame's
    for the same image and prompt (no text: the ``ocr`` default; "OCR: ": mode plain)."""
    caplog.set_level(logging.INFO, logger="ragws.serving.openai_api")
    server = await got_server(start_server, got_tiny_dir)
    sync, aio = sync_client(server), async_client(server)
    reasons = set()
    for i, (text, mode) in enumerate([(None, "format"), ("OCR: ", "plain"), ("", "format")]):
        image, max_tokens = images[i], 12 + 6 * i
        done = await ws_ocr(connect, server, image, mode=mode, max_tokens=max_tokens)

        answer = await asyncio.to_thread(
            sync.chat.completions.create,
            model=got_tiny_dir.name,
            messages=user(image, text),
            max_tokens=max_tokens,
            temperature=0,
        )
        (choice,) = answer.choices
        assert choice.message.content == done["text"], i
        assert choice.message.role == "assistant"
        assert choice.finish_reason == done["finish_reason"], i
        assert usage_dict(answer.usage) == usage_of(done)
        assert answer.model == got_tiny_dir.name and answer.object == "chat.completion"
        assert answer.id.startswith("chatcmpl-")
        reasons.add(choice.finish_reason)

        stream = await aio.chat.completions.create(
            model="anything",  # the served model answers whatever the name
            messages=user(image, text, text_first=True),  # parts in any order
            max_completion_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(deltas) == done["text"]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == done["finish_reason"] and not any(finishes[:-1])
        assert chunks[-1].choices == [] and usage_dict(chunks[-1].usage) == usage_of(done)
        assert all(c.usage is None for c in chunks[:-1])
        assert len({c.id for c in chunks}) == 1

        raw = await aio.chat.completions.with_raw_response.create(
            model=got_tiny_dir.name, messages=user(image, text), max_tokens=max_tokens
        )
        assert raw.http_request.url.path == "/v1/chat/completions"
        assert raw.headers["content-type"].startswith("application/json")
        assert raw.parse().choices[0].message.content == done["text"]
    assert reasons == {"stop", "length"}  # the tiny model is built to give both
    assert await server.metric("ragws_requests_total", {**KIND, "outcome": "ok"}) == 9
    assert await server.metric("ragws_kv_slots_used") == 0
    assert await server.metric("ragws_inflight_requests") == 0
    logged = [r for r in caplog.records if getattr(r, "type", None) == "chat_completions"]
    assert len(logged) == 9 and {r.outcome for r in logged} == {"ok"}
    assert all(r.request_id.startswith("chatcmpl-") and r.total_ms > 0 for r in logged)


async def test_langchain_chat_openai_with_an_image(start_server, connect, got_tiny_dir, images):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    server = await got_server(start_server, got_tiny_dir)
    done = await ws_ocr(connect, server, images[3], mode="format", max_tokens=20)
    llm = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="-",
        model=got_tiny_dir.name,
        temperature=0,
        max_tokens=20,
    )
    message = HumanMessage(
        content=[
            {"type": "text", "text": "OCR with format: "},
            {"type": "image_url", "image_url": {"url": data_url(images[3])}},
        ]
    )
    answer = await asyncio.to_thread(llm.invoke, [message])
    assert answer.content == done["text"]
    assert answer.usage_metadata["input_tokens"] == done["usage"]["prompt_tokens"]
    assert answer.usage_metadata["output_tokens"] == done["usage"]["completion_tokens"]
    assert answer.response_metadata["finish_reason"] == done["finish_reason"]
    pieces = [chunk async for chunk in llm.astream([message])]
    assert "".join(p.content for p in pieces) == done["text"]
    # A system message replaces the model's own system text: a shorter prompt here.
    with_system = await llm.ainvoke([SystemMessage("Read carefully."), message])
    assert with_system.usage_metadata["input_tokens"] < done["usage"]["prompt_tokens"]


async def test_custom_prompt_goes_through_the_models_template(start_server, got_tiny_dir, images):
    """A text that is not GOT's task prompt takes its place in the conversation the processor
    lays out; the answer is transformers' ``generate`` on that very prompt."""
    from transformers import AutoProcessor, GotOcr2ForConditionalGeneration

    model = GotOcr2ForConditionalGeneration.from_pretrained(got_tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(got_tiny_dir)
    stop = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    conversation = (
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<img><imgpad></img>\n"
        "Read the table.<|im_end|><|im_start|>assistant\n"
    )
    image = Image.open(io.BytesIO(images[4]))
    inputs = processor(images=image, text=conversation, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=16, eos_token_id=stop)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()

    server = await got_server(start_server, got_tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, *user(images[4], "Read the table.")]
    answer = await async_client(server).chat.completions.create(
        model="m", messages=messages, max_tokens=16
    )
    assert answer.choices[0].message.content == processor.tokenizer.decode(
        ids, skip_special_tokens=True
    )
    assert answer.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert answer.usage.completion_tokens == len(ids)
    # An image marker in the text cannot be: the prompt would hold two images.
    with pytest.raises(openai.BadRequestError, match="image markers"):
        await async_client(server).chat.completions.create(
            model="m", messages=user(images[4], "see <imgpad> here"), max_tokens=4
        )


async def test_sampling_seed_top_k_and_stop(start_server, got_tiny_dir, images):
    server = await got_server(start_server, got_tiny_dir, ocr_batch_size=1)
    client = async_client(server)

    async def ask(image: bytes, **params: Any) -> Any:
        answer = await client.chat.completions.create(
            model="m", messages=user(image), max_tokens=40, **params
        )
        return answer.choices[0], answer.usage

    greedy, greedy_usage = await ask(images[0], extra_body={"ignore_eos": True})
    assert greedy.finish_reason == "length" and greedy_usage.completion_tokens == 40
    # top_k 1 samples the argmax: the greedy text, through the sampling path.
    top1, _ = await ask(images[0], temperature=1.5, extra_body={"top_k": 1, "ignore_eos": True})
    assert top1.message.content == greedy.message.content
    # A seed makes a draw repeatable; different seeds draw differently.
    drawn = [
        (await ask(images[0], temperature=2.0, seed=seed, extra_body={"ignore_eos": True}))[0]
        for seed in (1, 1, 2, 3)
    ]
    texts = [choice.message.content for choice in drawn]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) == 3 and greedy.message.content not in texts
    nucleus, _ = await ask(
        images[0], temperature=1.0, top_p=1e-6, seed=5, extra_body={"ignore_eos": True}
    )
    assert nucleus.message.content == greedy.message.content  # only the likeliest token left
    # vLLM's repetition_penalty: 1 is none; a strong one changes what a random-weight model
    # (which repeats itself) says.
    same, _ = await ask(images[0], extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
    assert same.message.content == greedy.message.content
    penalized, _ = await ask(images[0], extra_body={"repetition_penalty": 2.0, "ignore_eos": True})
    assert penalized.message.content != greedy.message.content
    # HF's no_repeat_ngram_size, top-level or in vllm_xargs as MinerU's client sends it.
    unguarded, _ = await ask(images[0], extra_body={"no_repeat_ngram_size": 0, "ignore_eos": True})
    assert unguarded.message.content == greedy.message.content
    guarded = [
        (await ask(images[0], extra_body={**where, "ignore_eos": True}))[0].message.content
        for where in ({"no_repeat_ngram_size": 1}, {"vllm_xargs": {"no_repeat_ngram_size": 1}})
    ]
    assert guarded[0] == guarded[1] != greedy.message.content

    # A stop string ends the text before it, with finish_reason "stop", streamed or not.
    text = greedy.message.content
    stop = next(text[i : i + 2] for i in range(8, len(text) - 2) if text[i : i + 2].strip())
    expected = text[: text.find(stop)]
    stopped, stopped_usage = await ask(
        images[0], stop=[stop, "\x00never"], extra_body={"ignore_eos": True}
    )
    assert stopped.message.content == expected and stopped.finish_reason == "stop"
    assert stopped_usage.completion_tokens < 40
    stream = await client.chat.completions.create(
        model="m",
        messages=user(images[0]),
        max_tokens=40,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    await wait_metric(server, "ragws_kv_slots_used", 0)


def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(("END", "##"))
    assert stops.release("abc E") == "abc "  # "E" may begin "END"
    assert stops.release("N") == ""
    assert stops.release("x #") == "ENx "
    assert stops.release("#tail") == "" and stops.stopped
    assert stops.release("more") == ""
    tail = StopStrings(("END",))
    assert tail.release("abcEN") == "abc" and tail.release("", final=True) == "EN"


def test_special_tokens_can_be_kept(got_tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(got_tiny_dir)
    ids = [*tokenizer.encode("page <|im_start|>one <ref>two"), tokenizer.eos_token_id]
    for skip in (True, False):
        detok = IncrementalDetokenizer(
            tokenizer, frozenset({tokenizer.eos_token_id}), skip_special_tokens=skip
        )
        text = "".join(detok.push(i) for i in ids) + detok.flush()
        assert text == tokenizer.decode(ids[:-1], skip_special_tokens=skip)
        assert ("<ref>" in text) is not skip


# --- serving guarantees ----------------------------------------------------------------------


#: A stream that decodes for seconds, so that it is still running when the test looks.
LONG = {"max_tokens": 1700, "extra_body": {"ignore_eos": True}}


async def test_disconnect_mid_stream_frees_the_slot(start_server, got_tiny_dir, images):
    server = await got_server(start_server, got_tiny_dir, max_model_len=2048)
    client = async_client(server)
    stream = await client.chat.completions.create(
        model="m",
        messages=user(images[1]),
        stream=True,
        **LONG,
    )
    received = 0
    async for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    assert await server.metric("ragws_kv_slots_used") == 1
    await stream.close()  # drop the connection mid-stream
    await wait_metric(server, "ragws_kv_slots_used", 0)
    await wait_metric(server, "ragws_ocr_running", 0)
    await wait_metric(server, "ragws_inflight_requests", 0)
    await wait_metric(server, "ragws_requests_total", 1, {**KIND, "outcome": "cancelled"})
    generated = await server.metric("ragws_ocr_generated_tokens_total")
    assert generated < 1700
    await asyncio.sleep(0.2)
    assert await server.metric("ragws_ocr_generated_tokens_total") == generated


async def test_over_the_cap_is_a_rate_limit_error(start_server, got_tiny_dir, images):
    server = await got_server(start_server, got_tiny_dir, max_concurrent=1, max_model_len=2048)
    long = await async_client(server).chat.completions.create(
        model="m", messages=user(images[2]), stream=True, **LONG
    )
    await anext(aiter(long))  # admitted and streaming
    refused = sync_client(server, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await asyncio.to_thread(
            refused.chat.completions.create, model="m", messages=user(images[3]), max_tokens=4
        )
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "1"
    assert error.body["type"] == "rate_limit_error" and error.body["code"] == "overloaded"
    assert "capacity" in error.body["message"]
    await long.close()
    await wait_metric(server, "ragws_inflight_requests", 0)
    assert await server.metric("ragws_requests_total", {**KIND, "outcome": "overloaded"}) == 1


async def test_api_key_and_deadline_header(start_server, got_tiny_dir, images):
    server = await got_server(
        start_server, got_tiny_dir, api_key="s3cret", ocr_batch_size=1, max_model_len=2048
    )
    with pytest.raises(openai.AuthenticationError):
        await async_client(server, api_key="wrong").chat.completions.create(
            model="m", messages=user(images[0]), max_tokens=4
        )
    client = async_client(server, api_key="s3cret")
    assert (await client.models.list()).data[0].id == got_tiny_dir.name
    # The only KV slot is busy: a request with a short deadline times out while it waits.
    long = await client.chat.completions.create(
        model="m", messages=user(images[1]), stream=True, **LONG
    )
    await anext(aiter(long))
    late = async_client(server, api_key="s3cret", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        await late.chat.completions.create(
            model="m",
            messages=user(images[2]),
            max_tokens=4,
            extra_headers={"X-Deadline-Ms": "200"},
        )
    assert caught.value.status_code == 504 and caught.value.body["code"] == "timeout"
    await long.close()
    await wait_metric(server, "ragws_kv_slots_used", 0, api_key="s3cret")
    await wait_metric(server, "ragws_ocr_waiting", 0, api_key="s3cret")
    await wait_metric(server, "ragws_inflight_requests", 0, api_key="s3cret")
    timeouts = await metric(
        server, "ragws_requests_total", {**KIND, "outcome": "timeout"}, "s3cret"
    )
    assert timeouts == 1


async def test_a_remote_image_url_is_never_fetched(start_server, got_tiny_dir):
    hits: list[str] = []

    async def image(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=png(synthetic_images(1)[0]), content_type="image/png")

    app = web.Application()
    app.router.add_get("/page.png", image)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        server = await got_server(start_server, got_tiny_dir)
        for url in (f"http://127.0.0.1:{port}/page.png", f"HTTPS://127.0.0.1:{port}/page.png"):
            message = {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
            with pytest.raises(openai.BadRequestError) as caught:
                await async_client(server).chat.completions.create(
                    model="m", messages=[{"role": "user", "content": [message]}], max_tokens=4
                )
            assert "never fetched" in caught.value.body["message"]
            assert caught.value.body["type"] == "invalid_request_error"
        assert hits == []
    finally:
        await runner.cleanup()


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 4, **fields}


GOOD_PNG = png(synthetic_images(1, seed=9)[0])
GOOD = user(GOOD_PNG)


def with_part(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [part]}]


MALFORMED = {
    "not json": b"{'messages': [",
    "a JSON array": json.dumps([GOOD]).encode(),
    "not UTF-8": b'{"messages": "\xff\xfe"}',
    "no messages": body(),
    "messages not a list": body(messages={"role": "user"}),
    "empty messages": body(messages=[]),
    "a message not an object": body(messages=["hello"]),
    "no role": body(messages=[{"content": "hi"}]),
    "content a number": body(messages=[{"role": "user", "content": 7}]),
    "no user message": body(messages=[{"role": "system", "content": "OCR"}]),
    "an assistant turn": body(messages=[*GOOD, {"role": "assistant", "content": "x"}]),
    "an audio part": body(messages=with_part({"type": "input_audio", "input_audio": {}})),
    "a text part without text": body(messages=with_part({"type": "text", "text": 3})),
    "no image": body(messages=[{"role": "user", "content": "OCR: "}]),
    "two images": body(messages=[{"role": "user", "content": GOOD[0]["content"] * 2}]),
    "an image in a system message": body(
        messages=[{"role": "system", "content": GOOD[0]["content"]}, *GOOD]
    ),
    "an image url not a string": body(messages=with_part({"type": "image_url", "image_url": {}})),
    "a file URL": body(
        messages=with_part({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}})
    ),
    "a data URL that is not base64": body(
        messages=with_part({"type": "image_url", "image_url": {"url": "data:image/png,abc"}})
    ),
    "broken base64": body(
        messages=with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}})
    ),
    "a GIF": body(
        messages=with_part(
            {"type": "image_url", "image_url": {"url": data_url(GOOD_PNG, "image/gif")}}
        )
    ),
    "bytes that are no image": body(
        messages=with_part({"type": "image_url", "image_url": {"url": data_url(b"\x89PNG....")}})
    ),
    "n = 2": body(messages=GOOD, n=2),
    "a temperature as text": body(messages=GOOD, temperature="hot"),
    "a temperature out of range": body(messages=GOOD, temperature=5),
    "top_p 0": body(messages=GOOD, top_p=0),
    "max_tokens 0": body(messages=GOOD, max_tokens=0),
    "max_tokens true": body(messages=GOOD, max_tokens=True),
    "a stop number": body(messages=GOOD, stop=5),
    "an empty stop": body(messages=GOOD, stop=[""]),
    "stream as text": body(messages=GOOD, stream="yes"),
    "a seed as float": body(messages=GOOD, seed=1.5),
    "repetition_penalty 0": body(messages=GOOD, repetition_penalty=0),
    "repetition_penalty as text": body(messages=GOOD, repetition_penalty="high"),
    "repetition_penalty out of range": body(messages=GOOD, repetition_penalty=3),
    "no_repeat_ngram_size -1": body(messages=GOOD, no_repeat_ngram_size=-1),
    "vllm_xargs a list": body(messages=GOOD, vllm_xargs=[1]),
    "vllm_xargs' ngram as text": body(messages=GOOD, vllm_xargs={"no_repeat_ngram_size": "9"}),
}


async def test_malformed_bodies_are_400s_and_the_server_goes_on(start_server, got_tiny_dir):
    server = await got_server(start_server, got_tiny_dir, max_pdf_bytes=1_000_000)
    url = server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        for name, payload in MALFORMED.items():
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"}
            async with http.post(url, data=data, headers=headers) as resp:
                answer = await resp.json()
                assert resp.status == 400, (name, answer)
            error = answer["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["type"] == "invalid_request_error" and error["message"], name
            assert error["code"] == "bad_request", (name, error)
        # Bodies over the HTTP body limit (max_pdf_bytes + 1 MiB): refused, never read whole.
        huge = json.dumps(body(messages=user(GOOD_PNG + b"\x00" * 3_000_000))).encode()
        async with http.post(url, data=huge, headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "too_large"
        async with http.post(
            url, data=json.dumps(body(messages=GOOD)), headers={"X-Deadline-Ms": "soon"}
        ) as resp:
            assert resp.status == 400 and "X-Deadline-Ms" in (await resp.text())
    answer = await async_client(server).chat.completions.create(
        model="m", messages=GOOD, max_tokens=4
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert await server.metric("ragws_inflight_requests") == 0
    assert (
        await server.metric("ragws_requests_total", {**KIND, "outcome": "bad_request"})
        == len(MALFORMED) + 1
    )


async def test_images_over_max_frame_bytes_are_refused(start_server, got_tiny_dir):
    server = await got_server(start_server, got_tiny_dir, max_frame_bytes=4096)
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    image = png(Image.fromarray(big))
    assert len(image) > 4096
    with pytest.raises(openai.BadRequestError) as caught:
        await async_client(server).chat.completions.create(
            model="m", messages=user(image), max_tokens=4
        )
    assert caught.value.body["code"] == "too_large"


# --- the embedded line OCR -------------------------------------------------------------------


async def test_embedded_line_ocr_answers_too(start_server, connect, title_png):
    """``ragws serve`` with no flags: the lines' text is the content, lines are the tokens."""
    server = await start_server()
    done = await ws_ocr(connect, server, title_png)
    assert done["text"].count("\n") >= 1  # the title block has several lines
    client = async_client(server)
    assert [m.id for m in (await client.models.list()).data] == ["embedded"]
    answer = await client.chat.completions.create(
        model="embedded", messages=user(title_png, "Convert this page to markdown.")
    )
    assert answer.choices[0].message.content == done["text"]
    assert answer.choices[0].finish_reason == "stop"
    assert usage_dict(answer.usage) == usage_of(done)
    first_line = done["text"].split("\n")[0]
    stream = await client.chat.completions.create(
        model="embedded", messages=user(title_png), stream=True, stop=["\n"]
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == first_line
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- other tools' requests, as their sources build them ---------------------------------------


async def test_mineru_request_shape_and_unknown_fields(start_server, got_tiny_dir, caplog):
    """MinerU's ``vlm-http-client`` (mineru_vl_utils/vlm_client/http_client.py): the model's
    name from ``/v1/models`` (exactly one), a system message, the image before the text, and
    vLLM's extras, which are ignored and logged once each."""
    caplog.set_level(logging.INFO, logger="ragws.serving.openai_api")
    server = await got_server(start_server, got_tiny_dir)
    url = server.url
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/models") as resp:
            (card,) = (await resp.json())["data"]
        page = data_url(png(synthetic_images(1, seed=12)[0]))
        payload = {
            "model": card["id"],
            "messages": [
                {"role": "system", "content": "A conversation between a user and a model."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": page, "detail": "high"}},
                        {"type": "text", "text": "\nText Recognition:"},
                    ],
                },
            ],
            "priority": 0,
            "temperature": 0.0,
            "top_p": 0.01,
            "top_k": 1,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repetition_penalty": 1.0,
            "vllm_xargs": {"no_repeat_ngram_size": 100, "debug": False},
            "max_completion_tokens": 16,
            "skip_special_tokens": False,
        }
        for _ in range(2):
            async with http.post(url + "/v1/chat/completions", json=payload) as resp:
                assert resp.status == 200
                answer = await resp.json()
            choice = answer["choices"][0]
            assert choice["finish_reason"] in ("stop", "length")
            assert isinstance(choice["message"]["content"], str)
    ignored = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    expected = ["frequency_penalty", "presence_penalty", "priority"]
    assert len(ignored) == len(expected)  # each once over two requests
    for name in expected:
        assert sum(f"'{name}'" in line for line in ignored) == 1, name


async def test_olmocr_request_shape_over_its_own_http_client(start_server, got_tiny_dir):
    """olmOCR's ``--server`` path (olmocr/pipeline.py): the text before the image, sampling at
    0.1, its ``guided_regex`` extra, and a hand-written HTTP/1.1 client that sends
    ``Connection: close`` and reads only bodies with a ``Content-Length``."""
    server = await got_server(start_server, got_tiny_dir)
    page = data_url(png(synthetic_images(1, seed=13)[0]))
    query = {
        "model": "olmocr",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Attached is one page of a document. Read it."},
                    {"type": "image_url", "image_url": {"url": page}},
                ],
            }
        ],
        "max_tokens": 16,
        "temperature": 0.1,
        "guided_regex": r"---\nprimary_language: (?:[a-z]{2}|null)\n",
    }
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(query)
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n" + body).encode())
    await writer.drain()
    status = int((await reader.readline()).decode().split(" ", 2)[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    answer = json.loads(await reader.readexactly(int(headers["content-length"])))
    writer.close()
    await writer.wait_closed()
    assert status == 200
    assert answer["usage"]["total_tokens"] == sum(
        answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


# --- docling ---------------------------------------------------------------------------------


def docling_payload(image: Image.Image, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """The body docling's ``api_image_request`` posts for a page (docling/utils/
    api_image_request.py): the page as an RGBA PNG data URL, then the prompt, then
    ``ApiVlmOptions.params`` with its ``temperature`` merged in."""
    encoded = base64.b64encode(png(image, "RGBA")).decode("utf-8")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
                {"type": "text", "text": prompt},
            ],
        }
    ]
    return {"messages": messages, **params}


async def test_docling_request_shape(start_server, connect, got_tiny_dir):
    """docling's requests, replayed as its source builds them, plain and streamed; the answer
    has every field docling's ``OpenAiApiResponse`` requires."""
    server = await got_server(start_server, got_tiny_dir)
    page = synthetic_images(1, seed=11)[0]
    params = {"model": got_tiny_dir.name, "max_tokens": 24, "temperature": 0.0}
    done = await ws_ocr(connect, server, png(page), mode="format", max_tokens=24)
    url = server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        payload = docling_payload(page, "OCR with format:", params)
        async with http.post(url, json=payload) as resp:
            assert resp.status == 200 and resp.content_length is not None
            answer = await resp.json()
        assert isinstance(answer["id"], str) and isinstance(answer["created"], int)
        choice = answer["choices"][0]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == done["text"]
        assert choice["finish_reason"] == done["finish_reason"]
        assert answer["usage"]["total_tokens"] == sum(done["usage"].values())

        streamed = {**docling_payload(page, "OCR with format:", params), "stream": True}
        headers = {"Accept": "text/event-stream", "X-Temperature": "0.0"}
        async with http.post(url, json=streamed, headers=headers) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            lines = [line.strip() for line in (await resp.read()).decode().split("\n")]
    data = [line[len("data:") :].strip() for line in lines if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    pieces = [json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-1]]
    assert "".join(pieces) == done["text"]


async def test_docling_vlm_pipeline_converts_a_pdf(start_server, got_tiny_dir, tmp_path):
    """docling's own VLM pipeline with ``ApiVlmOptions`` pointed at ragws, on a one-page PDF
    written here (its content is noise with random weights: the transport is what is tested)."""
    pytest.importorskip("docling", reason="docling is not installed (pip install docling)")
    import pymupdf
    from docling.datamodel.base_models import InputFormat
    from docling.datamodel.pipeline_options import VlmPipelineOptions
    from docling.datamodel.pipeline_options_vlm_model import ApiVlmOptions, ResponseFormat
    from docling.document_converter import DocumentConverter, PdfFormatOption
    from docling.pipeline.vlm_pipeline import VlmPipeline

    server = await got_server(start_server, got_tiny_dir)
    pdf = tmp_path / "page.pdf"
    with pymupdf.open() as doc:
        doc.new_page().insert_text((72, 72), "Ring Attention with Blockwise Transformers")
        doc.save(pdf)
    options = VlmPipelineOptions(
        enable_remote_services=True,
        vlm_options=ApiVlmOptions(
            url=server.url + "/v1/chat/completions",
            params={"model": got_tiny_dir.name, "max_tokens": 24},
            prompt="OCR with format: ",
            timeout=120,
            scale=1.0,
            response_format=ResponseFormat.MARKDOWN,
        ),
    )
    converter = DocumentConverter(
        format_options={
            InputFormat.PDF: PdfFormatOption(pipeline_cls=VlmPipeline, pipeline_options=options)
        }
    )
    result = await asyncio.to_thread(converter.convert, pdf)
    (page,) = result.pages
    answer = page.predictions.vlm_response  # what ragws answered, as docling read it
    assert answer.text and answer.usage["completion_tokens"] == 24
    assert answer.usage["total_tokens"] == answer.usage["prompt_tokens"] + 24
    # Random weights rarely stop within 24 tokens: docling then keeps the page and notes the
    # cut ("partial"); nothing else may have gone wrong.
    assert result.status.name in ("SUCCESS", "PARTIAL_SUCCESS")
    assert all("stop_reason=length" in error.error_message for error in result.errors)
    assert result.document.export_to_markdown().strip()
    assert await server.metric("ragws_requests_total", {**KIND, "outcome": "ok"}) == 1
    assert await server.metric("ragws_ocr_generated_tokens_total") >= 1
