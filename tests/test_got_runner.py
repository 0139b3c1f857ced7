"""GotOcr2Runner under a real Scheduler and SlotAllocator is token-identical to HF ``generate``.

Every request's output from the continuous-batching runner (joining a running batch at
different steps, sharing 2-3 KV slots with others, next to aborted and finished sequences)
must equal ``model.generate(do_sample=False)`` on that request alone, stop token included.
The model is the tiny random-weight GOT-OCR2 of ``ragws.testing.got_tiny`` (fp32, CPU), whose
"mixed" stop calibration makes some greedy outputs end on ``<|im_end|>`` early.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GotOcr2ForConditionalGeneration"):
    pytest.skip("this transformers has no GOT-OCR2", allow_module_level=True)

from transformers import AutoProcessor, GotOcr2ForConditionalGeneration  # noqa: E402

from ragws.engine.sequence import FinishReason, SeqStatus, Sequence  # noqa: E402
from ragws.models.got_ocr2 import (  # noqa: E402
    HF_REPO,
    GotOcr2Runner,
    ModelUnavailableError,
    derive_image_tokens,
)
from ragws.testing.got_tiny import build_tiny_got_ocr2, synthetic_images  # noqa: E402

from .engine_loop import Request, ignore  # noqa: E402
from .engine_loop import drive as _drive  # noqa: E402

MAX_MODEL_LEN = 1536  # a 4-tile crop prompt is ~1070 tokens with the tiny model's 256 per tile


def drive(runner: GotOcr2Runner, requests: list[Request], **options: Any) -> Any:
    """The shared loop with this file's step budget (a page's tiles fit one step)."""
    return _drive(runner, requests, **{"max_prefill_tokens": 2048, **options})


def _images(n: int, seed: int) -> list[np.ndarray]:
    return [np.array(image) for image in synthetic_images(n, seed=seed)]


def _wide_image() -> np.ndarray:
    """A 3:1 page: crop mode cuts it into 3 tiles plus a thumbnail."""
    return np.array(synthetic_images(1, seed=7)[0].resize((384, 128)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_got_ocr2(tmp_path_factory.mktemp("got_runner"))


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> GotOcr2Runner:
    return GotOcr2Runner(str(model_dir), num_slots=3, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def reference(model_dir: Path, runner: GotOcr2Runner) -> Callable[[Request], list[int]]:
    """Greedy ids of HF ``generate`` on one request alone, through a separately loaded model
    and processor; ends with the stop token when the model stopped."""
    model = GotOcr2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    stops = sorted(runner.stop_ids)

    def generate(request: Request) -> list[int]:
        inputs = processor(
            images=request.image,
            format=request.mode == "format",
            crop_to_patches=request.crop,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=request.max_tokens,
                eos_token_id=stops,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return generate


def test_staggered_requests_match_solo_generate(
    runner: GotOcr2Runner, reference: Callable[[Request], list[int]]
) -> None:
    """11 requests (both modes, one multi-tile crop, different max_tokens) arrive at
    different steps into 3 slots: every output equals that request's solo ``generate``."""
    plain, fmt = _images(8, seed=0), _images(3, seed=1)
    requests = [
        Request(plain[0], "plain", 20, arrive=0),  # stops: [token, <|im_end|>]
        Request(plain[1], "plain", 20, arrive=0),
        Request(fmt[0], "format", 9, arrive=0),
        Request(plain[2], "plain", 20, arrive=1),  # stops early
        Request(fmt[1], "format", 16, arrive=2),
        Request(_wide_image(), "format", 6, arrive=3, crop=True),
        Request(plain[3], "plain", 3, arrive=5),
        Request(plain[4], "plain", 20, arrive=5),  # stops early
        Request(fmt[2], "format", 20, arrive=6),
        Request(plain[5], "plain", 12, arrive=9),
        Request(plain[7], "plain", 20, arrive=14),
    ]
    run = drive(runner, requests, num_slots=3, max_prefill_tokens=700)

    for seq, request in zip(run.seqs, requests, strict=True):
        assert seq.status is SeqStatus.FINISHED and seq.slot is None
        assert seq.output_ids == reference(request), seq.seq_id
    reasons = [seq.finish_reason for seq in run.seqs]
    assert FinishReason.STOP in reasons and FinishReason.LENGTH in reasons
    assert any(seq.output_ids[-1] in runner.stop_ids for seq in run.seqs)
    # What the schedule exercised: batched equal-length prefill, prefill next to running
    # decodes, prompts of several lengths, every slot used more than once.
    lengths = [{n for _, n in s.prefill} for s in run.steps]
    assert any(len(s.prefill) > len(n) for s, n in zip(run.steps, lengths, strict=True))
    assert any(s.prefill and s.decode for s in run.steps)
    assert len(set().union(*lengths)) >= 3
    admitted = [slot for s in run.steps for slot, _ in s.prefill]
    assert all(admitted.count(slot) >= 2 for slot in range(3))


def test_abort_leaves_the_others_unchanged(
    runner: GotOcr2Runner, reference: Callable[[Request], list[int]]
) -> None:
    """Aborting a running sequence (and a waiting one) between steps frees its slot for a
    waiting request; the other outputs still equal their solo ``generate``."""
    images = _images(5, seed=2)
    modes = ["plain", "format", "plain", "format", "plain"]
    requests = [Request(image, mode, 14) for image, mode in zip(images, modes, strict=True)]
    run = drive(runner, requests, num_slots=2, aborts={3: [1], 4: [4]})

    aborted, never_ran = run.seqs[1], run.seqs[4]
    assert aborted.finish_reason is FinishReason.CANCELLED
    assert 0 < len(aborted.output_ids) < 14
    assert never_ran.finish_reason is FinishReason.CANCELLED and not never_ran.output_ids
    assert run.steps[3].prefill == [(1, run.seqs[2].num_prompt_tokens)]  # took the freed slot
    for i in (0, 2, 3):
        assert run.seqs[i].output_ids == reference(requests[i])
    assert aborted.output_ids == reference(requests[1])[: len(aborted.output_ids)]


def test_decode_over_a_sparse_slot_view(
    runner: GotOcr2Runner, reference: Callable[[Request], list[int]]
) -> None:
    """Decodes whose cache view ``[:S, :, :T]`` spans a free slot, a slot prefilled in the
    same step, and stale keys/values of a longer earlier occupant inside ``T`` are unaffected
    by those entries."""
    plain, fmt = _images(8, seed=0), _images(3, seed=1)
    requests = [
        # Fill every slot with a long format answer, leaving stale keys/values behind.
        *(Request(image, "format", 24, arrive=0) for image in fmt),
        # Reuse all three at once (one batched prefill); slot 0 stops at its 2nd token.
        Request(plain[0], "plain", 20, arrive=24),
        Request(plain[1], "plain", 20, arrive=24),
        Request(plain[6], "plain", 20, arrive=24),
        # Back into slot 0 while slots 1 and 2 decode: idle row first, then a row behind them.
        Request(plain[7], "plain", 20, arrive=30),
    ]
    run = drive(runner, requests, num_slots=3)

    for seq, request in zip(run.seqs, requests, strict=True):
        assert seq.output_ids == reference(request), seq.seq_id
    assert run.seqs[3].finish_reason is FinishReason.STOP and len(run.seqs[3].output_ids) == 2
    written = [0] * 3  # high-water mark of positions ever written, per slot
    sparse = prefilled_below = stale_in_view = False
    for step in run.steps:
        decoded = list(zip(step.decode, step.positions, strict=True))  # (slot, position)
        for slot, length in step.prefill:
            written[slot] = max(written[slot], length)
        if not decoded:
            continue
        rows, span = 1 + max(step.decode), 1 + max(step.positions)
        sparse |= rows > len(decoded)
        prefilled_below |= any(slot < rows for slot, _ in step.prefill)
        stale_in_view |= any(written[slot] > pos + 1 < span for slot, pos in decoded)
        for slot, pos in decoded:
            written[slot] = max(written[slot], pos + 1)
    assert sparse and prefilled_below and stale_in_view


def test_idle_rows_never_write_the_cache(runner: GotOcr2Runner) -> None:
    """A decode over ``[:S]`` leaves the rows of non-decoding slots untouched, bit for bit,
    including a slot prefilled earlier in the same step (white-box: reads the cache)."""
    images = _images(2, seed=6)
    first, second = (runner.prepare(image, mode="plain") for image in images)

    def seq(seq_id: int, prompt: Any, slot: int) -> Sequence:
        out = Sequence(seq_id, prompt.prompt_ids, prompt, 8, runner.stop_ids, ignore)
        out.slot = slot
        return out

    runner.step([seq(100, first, 0)], [])
    slot0 = [(k[0].clone(), v[0].clone()) for k, v in zip(runner._k, runner._v, strict=True)]
    running = seq(101, second, 2)
    running.append(runner.step([running], [])[0])
    # Slot 0 is prefilled again (same prompt, same values) while slot 2 decodes over [:3].
    runner.step([seq(102, first, 0)], [running])
    for (k, v), (k0, v0) in zip(zip(runner._k, runner._v, strict=True), slot0, strict=True):
        assert torch.equal(k[0], k0) and torch.equal(v[0], v0)


def test_image_tokens_match_prompt_and_projector(runner: GotOcr2Runner, model_dir: Path) -> None:
    image = _images(1, seed=3)[0]
    prompt = runner.prepare(image, mode="plain")
    assert prompt.prompt_ids.count(runner.model.config.image_token_id) == runner.image_tokens
    with torch.inference_mode():
        got = runner.model.model
        hidden = got.vision_tower(prompt.pixel_values).last_hidden_state
        features = got.multi_modal_projector(hidden)
    assert features.shape[1] == runner.image_tokens == 256
    assert prompt.pixel_values.dtype == torch.float32 and prompt.pixel_values.shape[0] == 1

    processor = AutoProcessor.from_pretrained(model_dir)
    for mode, crop in [("plain", False), ("format", False), ("format", True)]:
        page = _wide_image() if crop else image
        expected = processor(images=page, format=mode == "format", crop_to_patches=crop)
        prompt = runner.prepare(page, mode=mode, crop=crop)
        assert prompt.prompt_ids == list(expected["input_ids"][0])
        assert prompt.prompt_ids.count(runner.image_token_id) == 256 * prompt.tiles
    assert prompt.tiles == 4
    with pytest.raises(ValueError, match="mode"):
        runner.prepare(image, mode="markdown")


def test_smaller_vision_grid_derives_its_token_count(tmp_path: Path, model_dir: Path) -> None:
    """A checkpoint of the same architecture on 64 px images has a 32 × 32 patch grid, hence
    8 × 8 = 64 image tokens: the runner derives that and tells the processor (whose default
    is 256), and still matches ``generate`` given the same count."""
    from transformers import GotOcr2Config

    from ragws.testing.got_tiny import randomize

    config = GotOcr2Config.from_pretrained(model_dir)
    config.vision_config.image_size = 64
    config.image_seq_length = 64
    torch.manual_seed(0)
    model = GotOcr2ForConditionalGeneration(config).eval()
    randomize(model, seed=1)
    model.save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_processor.size = {"height": 64, "width": 64}
    processor.save_pretrained(tmp_path)

    small = GotOcr2Runner(str(tmp_path), num_slots=2, max_model_len=256)
    assert small.image_tokens == derive_image_tokens(small.model) == 64
    assert processor.num_image_tokens == 256
    images = _images(3, seed=4)
    requests = [Request(image, "plain", 6, arrive=i) for i, image in enumerate(images)]
    run = drive(small, requests, num_slots=2)
    stops = sorted(small.stop_ids)
    for seq, request in zip(run.seqs, requests, strict=True):
        assert seq.num_prompt_tokens < 128
        assert seq.prompt_ids.count(small.image_token_id) == 64
        assert seq.image is None  # the pixels are released after the prefill
        inputs = processor(images=request.image, num_image_tokens=64, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=6, eos_token_id=stops)
        assert seq.output_ids == out[0, inputs["input_ids"].shape[1] :].tolist()


def test_prepare_is_thread_safe(runner: GotOcr2Runner) -> None:
    images = _images(8, seed=5)
    serial = [runner.prepare(image, mode="format").prompt_ids for image in images]
    results: list[list[int] | None] = [None] * len(images)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = runner.prepare(images[i], mode="format").prompt_ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == serial


def test_kv_cache_is_preallocated_in_slots(runner: GotOcr2Runner, model_dir: Path) -> None:
    text = runner.model.config.text_config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * runner.head_dim * 4
    assert runner.kv_bytes_per_token() == per_token
    assert runner.kv_cache_bytes() == 3 * MAX_MODEL_LEN * per_token
    budget = 2 * 512 * per_token + 1
    sized = GotOcr2Runner(str(model_dir), num_slots=16, max_model_len=512, kv_budget_bytes=budget)
    assert sized.num_slots == 2
    assert sized.kv_cache_bytes() == 2 * 512 * per_token
    with pytest.raises(ValueError, match="kv_budget_bytes"):
        GotOcr2Runner(str(model_dir), max_model_len=512, kv_budget_bytes=per_token)


def test_load_errors_name_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        GotOcr2Runner(str(tmp_path / "missing"))

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(GotOcr2ForConditionalGeneration, "from_pretrained", offline)
    with pytest.raises(ModelUnavailableError, match=HF_REPO) as info:
        GotOcr2Runner("got-ocr2")
    assert "local directory" in str(info.value)
