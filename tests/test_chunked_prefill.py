"""Chunked prefill on the tiny GOT-OCR2 and Qwen2-VL: token-identical to HF ``generate``.

A prompt longer than the step's prompt-token budget is prefilled over several steps, its image
split between chunks, while the running streams keep decoding a token every step; its output
must still equal ``model.generate(do_sample=False)`` on that request alone (fp32, CPU), and so
must the others'. Its images are encoded once, when the first chunk that holds a placeholder
runs, and dropped once the prefill has passed them, or when the sequence is aborted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GotOcr2ForConditionalGeneration") or not hasattr(
    transformers, "Qwen2VLForConditionalGeneration"
):
    pytest.skip("this transformers has no GOT-OCR2 or Qwen2-VL", allow_module_level=True)

from transformers import AutoProcessor  # noqa: E402

from ragws.engine.sequence import FinishReason, SeqStatus  # noqa: E402
from ragws.models import load_ocr_runner  # noqa: E402
from ragws.models.slot_runner import SlotRunner  # noqa: E402
from ragws.testing.got_tiny import synthetic_images  # noqa: E402

from .engine_loop import Request, Run  # noqa: E402
from .engine_loop import drive as _drive  # noqa: E402
from .reference import generate_alone, generate_inputs, vlm_chat  # noqa: E402

NUM_SLOTS = 4


@dataclass
class Family:
    """A loaded runner, its reference, and the requests it takes: short prompts (whole in one
    step's budget) and long ones (a page of several tiles or a long instruction)."""

    model_dir: Path
    runner: SlotRunner
    generate: Callable[[Request], list[int]]  # HF generate's greedy output, stop included
    short: Callable[[int, int], Request]  # (image index, max_tokens)
    long: Callable[[int, int], Request]
    encoded: list[Any] = field(default_factory=list)  # the prepared requests encoded, in order


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    return [np.array(image) for image in synthetic_images(n, seed=seed)]


def _got(model_dir: Path) -> Family:
    from transformers import GotOcr2ForConditionalGeneration

    runner = load_ocr_runner(str(model_dir), "cpu", num_slots=NUM_SLOTS, max_model_len=1536)
    model = GotOcr2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)

    def generate(req: Request) -> list[int]:
        inputs = processor(
            images=req.image,
            format=req.mode == "format",
            crop_to_patches=req.crop,
            return_tensors="pt",
        )
        stops = sorted(runner.stop_ids)
        return generate_inputs(model.eval(), processor, inputs, req.max_tokens, stops)[1]

    plain = _images(8, seed=0)
    # 3:1 pages: crop mode cuts each into 3 tiles and a thumbnail, ~1070 prompt tokens.
    wide = [np.array(image.resize((384, 128))) for image in synthetic_images(3, seed=7)]
    return Family(
        model_dir,
        runner,
        generate,
        short=lambda i, n: Request(plain[i], "plain", n),
        long=lambda i, n: Request(wide[i], "format", n, crop=True),
    )


def _qwen(model_dir: Path) -> Family:
    runner = load_ocr_runner(str(model_dir), "cpu", num_slots=NUM_SLOTS, max_model_len=512)
    config = json.loads((model_dir / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    model = model_class.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)

    def generate(req: Request) -> list[int]:
        messages = vlm_chat(config["architectures"][0], req.image, req.mode)
        stops = sorted(runner.stop_ids)
        return generate_alone(model.eval(), processor, messages, req.max_tokens, stops)[1]

    images = _images(8, seed=0)
    # MinerU's block prompt (~60 tokens) is short; olmOCR's page prompt (~200 tokens, its
    # instruction before the image) is long.
    return Family(
        model_dir,
        runner,
        generate,
        short=lambda i, n: Request(images[i], "text", n),
        long=lambda i, n: Request(images[i], "page", n),
    )


@pytest.fixture(scope="module", params=["got", "qwen2_vl"])
def family(request: pytest.FixtureRequest) -> Family:
    build = _got if request.param == "got" else _qwen
    fam = build(request.getfixturevalue(f"{request.param}_tiny_dir"))
    encode = fam.runner.family.encode_images

    def recording(prepared: list[Any]) -> list[Any]:
        fam.encoded.extend(prepared)
        return encode(prepared)

    fam.runner.family.encode_images = recording  # type: ignore[method-assign]
    generate, outputs = fam.generate, {}

    def cached(req: Request) -> list[int]:
        key = (id(req.image), req.mode, req.max_tokens, req.crop)
        if key not in outputs:
            outputs[key] = generate(req)
        return outputs[key]

    fam.generate = cached
    return fam


def drive(
    fam: Family,
    requests: list[Request],
    *,
    budget: int,
    aborts: dict[int, list[int]] | None = None,
    on_step: Callable[[int, Run], None] | None = None,
) -> Run:
    """The shared loop over the family's runner, with ``budget`` prompt tokens a step."""
    return _drive(
        fam.runner,
        requests,
        num_slots=NUM_SLOTS,
        max_prefill_tokens=budget,
        aborts=aborts,
        on_step=on_step,
        encoded=fam.encoded,
        max_steps=300,
    )


def _image_span(fam: Family, req: Request) -> tuple[int, int, int]:
    """The prompt's length and its first and last image placeholder."""
    ids = fam.runner.prepare(req.image, mode=req.mode, crop=req.crop).prompt_ids
    token = fam.runner.family.image_token_id
    return len(ids), ids.index(token), len(ids) - 1 - ids[::-1].index(token)


def _splitting_budget(fam: Family, long: Request, shorts: list[Request]) -> int:
    """A step budget that holds each short prompt whole, splits the long one in at least three
    chunks (from position 0), the last one short, with a chunk boundary inside its image."""
    longest = max(_image_span(fam, r)[0] for r in shorts)
    length, first, last = _image_span(fam, long)
    for budget in range(longest, (length - 1) // 2):
        splits = any(first < k * budget <= last for k in range(1, length // budget + 1))
        if splits and length % budget:  # a last chunk shorter than the budget: room after it
            return budget
    raise AssertionError("no budget splits the long prompt's image")


def _full_runs(fam: Family, max_tokens: int, count: int) -> list[Request]:
    """Short requests whose greedy answer runs to ``max_tokens`` (no early stop), so that
    they decode through a whole chunked prefill."""
    found = []
    for i in range(8):
        req = fam.short(i, max_tokens)
        if not fam.runner.stop_ids & set(fam.generate(req)):
            found.append(req)
        if len(found) == count:
            return found
    raise AssertionError("the tiny model's stop calibration changed")


def test_a_long_prompt_is_chunked_while_others_decode(family: Family) -> None:
    """Two streams decode; a prompt over the budget arrives and is prefilled over several
    steps: the streams get a token at every one of them, the long prompt's image is encoded
    once, and every output equals its solo ``generate``."""
    shorts = _full_runs(family, 12, 2)
    long = family.long(0, 6)
    long.arrive = 2
    requests = [*shorts, long]
    budget = _splitting_budget(family, long, shorts)
    length, first, _ = _image_span(family, long)
    run = drive(family, requests, budget=budget)

    for seq, req in zip(run.seqs, requests, strict=True):
        assert seq.status is SeqStatus.FINISHED and seq.slot is None
        assert seq.output_ids == family.generate(req), seq.seq_id
    chunks = [(i, c) for i, step in enumerate(run.steps) for c in step.chunks if c[0] == 2]
    assert [c for _, c in chunks] == [
        (2, a, min(a + budget, length)) for a in range(0, length, budget)
    ]
    assert len(chunks) >= 3
    for i, _ in chunks:  # the running streams decode through the whole prefill
        assert run.steps[i].decoding == [0, 1]
    # Encoded once, by the first chunk that holds an image placeholder (not before), and the
    # features gone with the prefill.
    encoded_at = [i for i, step in enumerate(run.steps) if 2 in step.encoded]
    first_chunk = next(i for i, (_, a, b) in chunks if a <= first < b)
    assert encoded_at == [first_chunk]
    assert run.seqs[2].features is None and run.seqs[2].image is None


def test_several_chunked_prompts_at_once(family: Family) -> None:
    """Three long prompts arrive together beside a decoding stream: the partly prefilled one
    goes first, the next takes what it leaves, each is encoded once, and every output equals
    its solo ``generate``."""
    short = _full_runs(family, 10, 1)[0]
    longs = [family.long(i, 5) for i in range(3)]
    for req in longs:
        req.arrive = 1
    requests = [short, *longs]
    budget = _splitting_budget(family, longs[0], [short])
    run = drive(family, requests, budget=budget)

    for seq, req in zip(run.seqs, requests, strict=True):
        assert seq.output_ids == family.generate(req), seq.seq_id
        assert seq.features is None
    order = []
    for step in run.steps:
        assert sum(b - a for _, a, b in step.chunks) <= budget
        ids = [i for i, _, _ in step.chunks]
        assert ids == sorted(ids)  # the partly prefilled one first, then the newcomer
        order += [i for i in ids if i not in order]
    assert order == [0, 1, 2, 3]
    assert any(len(step.chunks) == 2 for step in run.steps)  # one's tail, the next's head
    assert sorted(i for step in run.steps for i in step.encoded) == [0, 1, 2, 3]
    # The decoding stream got a token at every step until it ended.
    ended = len(run.seqs[0].output_ids)
    assert all(0 in step.decoding for step in run.steps[1:ended])


def test_abort_mid_prefill_frees_the_slot_and_the_features(family: Family) -> None:
    """A long prompt aborted after the chunk that encoded its image, mid-image: its slot is
    free for the next step, whose newcomer overwrites the partial keys/values and still
    equals ``generate``, and its features and pixels are dropped."""
    long = family.long(1, 5)
    waiting = _full_runs(family, 6, 1)[0]
    budget = _splitting_budget(family, long, [waiting])
    _, first, last = _image_span(family, long)
    encoding = first // budget  # the step of the chunk that holds the first placeholder
    waiting.arrive = encoding + 1
    seen: dict[str, Any] = {}

    def after(step: int, run: Run) -> None:
        if step == encoding:
            seq = run.seqs[0]
            seen.update(computed=seq.num_computed_tokens, features=seq.features, slot=seq.slot)

    run = drive(family, [long, waiting], budget=budget, aborts={encoding + 1: [0]}, on_step=after)
    aborted, other = run.seqs
    assert first < seen["computed"] <= last and seen["features"] is not None  # mid-image
    assert [step.encoded for step in run.steps[: encoding + 1]] == [[]] * encoding + [[0]]
    assert aborted.finish_reason is FinishReason.CANCELLED and not aborted.output_ids
    assert aborted.slot is None and aborted.features is None and aborted.image is None
    # The waiting request took the aborted one's slot at the very next step.
    step = run.steps[encoding + 1]
    assert step.chunks == [(1, 0, other.num_prompt_tokens)] and [
        slot for slot, _ in step.prefill
    ] == [seen["slot"]]
    assert other.output_ids == family.generate(waiting)
    assert run.scheduler.slots.used == 0


def test_kv_cache_accounts_for_each_models_shapes(family: Family) -> None:
    """The KV budget (``--ocr-kv-cache-mb``) is sized with the model's own layers, KV heads
    and head size, as its text config gives them."""
    runner = family.runner
    text = runner.family.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4  # fp32
    assert (runner.num_layers, runner.num_kv_heads, runner.head_dim) == (
        text.num_hidden_layers,
        text.num_key_value_heads,
        head_dim,
    )
    assert runner.kv_bytes_per_token() == per_token
    assert runner.kv_cache_bytes() == NUM_SLOTS * runner.max_model_len * per_token
    # --ocr-kv-cache-mb with room for two and a half slots of this model: two slots.
    per_slot = runner.max_model_len * per_token
    sized = load_ocr_runner(
        str(family.model_dir),
        "cpu",
        num_slots=16,
        max_model_len=runner.max_model_len,
        kv_cache_mb=2.5 * per_slot / 2**20,
    )
    assert sized.num_slots == 2 and sized.kv_cache_bytes() == 2 * per_slot
