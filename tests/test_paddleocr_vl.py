"""PaddleOCR-VL on the slot runner is token-identical to HF ``generate``.

A tiny random-weight checkpoint of ``ragws.testing.paddleocr_vl_tiny`` (fp32 on the CPU):
requests with images of different sizes, hence prompts of different lengths and different M-RoPE
positions, join a running batch at different steps and share 3 KV slots: every output must equal
``model.generate(do_sample=False)`` on that request alone, from the inputs the model's own
processor and chat template make of it, stop token included.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "PaddleOCRVLForConditionalGeneration"):
    pytest.skip("this transformers has no PaddleOCR-VL", allow_module_level=True)

from transformers import AutoProcessor  # noqa: E402

from ragws.engine.sequence import FinishReason, Sampling, SeqStatus  # noqa: E402
from ragws.models import load_ocr_runner  # noqa: E402
from ragws.models.paddleocr_vl import ARCHITECTURE, PaddleOcrVlRunner  # noqa: E402
from ragws.testing.got_tiny import synthetic_images  # noqa: E402

from .engine_loop import Request, drive  # noqa: E402
from .reference import generate_alone, vlm_chat  # noqa: E402

MAX_MODEL_LEN = 256  # prompts are under 60 tokens, up to 36 of them image tokens


@dataclass
class Case:
    runner: PaddleOcrVlRunner
    generate: Callable[[Request], tuple[list[int], list[int]]]  # (prompt ids, output ids)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    return [np.array(image) for image in synthetic_images(n, seed=seed)]


@pytest.fixture(scope="module")
def case(paddleocr_vl_tiny_dir: Path) -> Case:
    """The runner that ``load_ocr_runner`` picks for the checkpoint, and the reference: HF
    ``generate`` on one request alone, through a separately loaded model and processor."""
    model_dir = paddleocr_vl_tiny_dir
    runner = load_ocr_runner(str(model_dir), "cpu", num_slots=3, max_model_len=MAX_MODEL_LEN)
    assert isinstance(runner, PaddleOcrVlRunner)
    model = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    stops = sorted(runner.stop_ids)

    def generate(req: Request) -> tuple[list[int], list[int]]:
        messages = vlm_chat(ARCHITECTURE, req.image, req.mode, req.prompt)
        return generate_alone(model, processor, messages, req.max_tokens, stops)

    return Case(runner, generate)


def _runs_full(output: list[int], max_tokens: int, stops: frozenset[int]) -> bool:
    return len(output) == max_tokens and not stops & set(output)


def test_staggered_requests_match_solo_generate(case: Case) -> None:
    """8 requests (the text prompt on images of three sizes and a transposed one, the chart and
    formula prompts, a table with a prompt of its own) arrive at different steps into 3 slots:
    every output equals that request's solo ``generate``, and every prompt equals what the
    processor's chat template makes of the request."""
    images = _images(6)
    transposed = np.ascontiguousarray(images[0].transpose(1, 0, 2))
    # The tiny model's stop calibration ("OCR:", images 0-5, 12 tokens) makes at least two of
    # these stop early and two run to the end: at least one of each among 0-4.
    requests = [
        Request(images[0], "text", 12, arrive=0),
        Request(transposed, "text", 12, arrive=0),  # same length, other positions
        Request(images[1], "text", 12, arrive=0),
        Request(images[2], "text", 12, arrive=1),
        Request(images[3], "text", 12, arrive=2),
        Request(images[4], "chart", 12, arrive=4),
        Request(images[5], "formula", 9, arrive=5),
        Request(images[2], "table", 7, arrive=8, prompt="Read the table."),
    ]
    run = drive(case.runner, requests, num_slots=3)

    for seq, req in zip(run.seqs, requests, strict=True):
        assert seq.status is SeqStatus.FINISHED and seq.slot is None
        prompt, output = case.generate(req)
        assert seq.prompt_ids == prompt, seq.seq_id
        assert seq.output_ids == output, seq.seq_id
    reasons = [seq.finish_reason for seq in run.seqs]
    assert FinishReason.STOP in reasons and FinishReason.LENGTH in reasons
    # What the schedule exercised: an equal-length prefill of two images whose M-RoPE
    # positions differ, prefill next to running decodes, several prompt lengths, slot reuse.
    length = run.seqs[0].num_prompt_tokens
    assert run.seqs[1].num_prompt_tokens == length
    assert run.steps[0].prefill[:2] == [(0, length), (1, length)]
    assert any(s.prefill and s.decode for s in run.steps)
    assert len({n for s in run.steps for _, n in s.prefill}) >= 4
    admitted = [slot for s in run.steps for slot, _ in s.prefill]
    assert len(admitted) == 8 and len(set(admitted)) == 3


def test_prompt_is_the_chat_templates(case: Case) -> None:
    """The prompt is PaddleOCR-VL's layout: no system turn, the image markers around one
    placeholder per merged patch, then the task prompt and ``Assistant: ``."""
    image = _images(1)[0]
    prepared = case.runner.prepare(image, mode="formula")
    placeholder = case.runner.family.image_token_id
    count = prepared.prompt_ids.count(placeholder)
    assert count == int(prepared.image_grid_thw.prod()) // 4
    text = case.runner.tokenizer.decode(prepared.prompt_ids)
    assert text == (
        "<|begin_of_sentence|>User: <|IMAGE_START|>"
        + "<|IMAGE_PLACEHOLDER|>" * count
        + "<|IMAGE_END|>Formula Recognition:\nAssistant: "
    )


def test_positions_are_the_models_own(case: Case) -> None:
    """The prepared M-RoPE positions and delta are ``get_rope_index``'s for the request, and
    an image and its transpose share a length but not their positions."""
    image = _images(1)[0]
    wide = case.runner.prepare(image, mode="text")
    tall = case.runner.prepare(np.ascontiguousarray(image.transpose(1, 0, 2)), mode="text")
    assert len(wide.prompt_ids) == len(tall.prompt_ids)
    assert not torch.equal(wide.rope_positions, tall.rope_positions)
    for prepared in (wide, tall):
        positions = prepared.rope_positions
        length = len(prepared.prompt_ids)
        assert positions.shape == (3, length)
        assert prepared.rope_delta == int(positions.max()) + 1 - length < 0
        # Text before and after the image advances all three axes together.
        assert bool((positions[:, :3] == positions[0, :3]).all())
        assert bool((positions[:, -1] == positions[0, -1]).all())


def test_seeded_sampling_is_reproducible(case: Case) -> None:
    """A seeded sampling request draws the same tokens alone and amid staggered greedy
    requests; the greedy ones still equal their solo ``generate``."""
    images = _images(6, seed=3)
    sampled = Request(images[0], "text", 10, sampling=Sampling(temperature=1.5, seed=1234))
    alone = drive(case.runner, [sampled], num_slots=1).seqs[0]
    crowd = [
        Request(images[1], "text", 10, arrive=0),
        Request(images[2], "table", 6, arrive=0),
        Request(images[0], "text", 10, arrive=1, sampling=sampled.sampling),
        Request(images[3], "text", 8, arrive=3),
    ]
    run = drive(case.runner, crowd, num_slots=3)
    assert run.seqs[2].output_ids == alone.output_ids
    assert len(alone.output_ids) >= 2
    for i in (0, 1, 3):
        assert run.seqs[i].output_ids == case.generate(crowd[i])[1]


def test_abort_frees_the_slot_before_the_next_step(case: Case) -> None:
    """Aborting a running sequence between steps frees its slot for the next step's
    schedule; the other outputs still equal their solo ``generate``."""
    images = _images(6)
    candidates = [Request(image, "text", 12) for image in images]
    # Sequences that run past step 3 without stopping, so the abort is what frees a slot.
    stops = case.runner.stop_ids
    long = [r for r in candidates if _runs_full(case.generate(r)[1], 12, stops)][:2]
    assert len(long) == 2, "the tiny model's stop calibration changed"
    requests = [*long, Request(images[1], "table", 6), Request(images[2], "formula", 5)]
    run = drive(case.runner, requests, num_slots=2, aborts={3: [1]})

    aborted = run.seqs[1]
    assert aborted.finish_reason is FinishReason.CANCELLED
    assert aborted.output_ids and len(aborted.output_ids) < 12
    assert run.steps[3].prefill == [(1, run.seqs[2].num_prompt_tokens)]  # took the freed slot
    for i in (0, 2, 3):
        assert run.seqs[i].output_ids == case.generate(requests[i])[1]
    assert aborted.output_ids == case.generate(requests[1])[1][: len(aborted.output_ids)]


def test_prepare_options(case: Case) -> None:
    image = _images(1)[0]
    runner = case.runner
    text = runner.prepare(image, mode="text").prompt_ids
    assert runner.prepare(image, mode="format").prompt_ids == text
    assert runner.prepare(image, mode="plain").prompt_ids == text
    tokenizer = runner.tokenizer
    chart = tokenizer.decode(runner.prepare(image, mode="chart").prompt_ids)
    assert chart.endswith("<|IMAGE_END|>Chart Recognition:\nAssistant: ")
    custom = tokenizer.decode(runner.prepare(image, mode="table", prompt="Read it.").prompt_ids)
    assert custom.endswith("<|IMAGE_END|>Read it.\nAssistant: ")
    system = tokenizer.decode(runner.prepare(image, mode="text", system="Be brief.").prompt_ids)
    assert system.startswith("<|begin_of_sentence|>Be brief.\nUser: <|IMAGE_START|>")
    with pytest.raises(ValueError, match="mode"):
        runner.prepare(image, mode="markdown")
    with pytest.raises(ValueError, match="crop"):
        runner.prepare(image, mode="text", crop=True)
    with pytest.raises(ValueError, match="image markers"):
        runner.prepare(image, mode="text", prompt="<|IMAGE_PLACEHOLDER|>")
    names = {tokenizer.convert_ids_to_tokens(i) for i in runner.stop_ids}
    assert names == {"</s>"}


def test_loader_picks_the_family_from_config_json(
    tmp_path: Path, paddleocr_vl_tiny_dir: Path
) -> None:
    from ragws.models import OCR_ARCHITECTURES, checkpoint_architecture

    architecture = "PaddleOCRVLForConditionalGeneration"
    assert checkpoint_architecture(str(paddleocr_vl_tiny_dir)) == architecture
    assert OCR_ARCHITECTURES[architecture] == "paddleocr_vl"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paddleocr_vl"}))
    assert checkpoint_architecture(str(tmp_path)) == architecture
