"""Qwen2-VL and Qwen2.5-VL on the slot runner are token-identical to HF ``generate``.

For each architecture (tiny random-weight checkpoints of ``ragws.testing.qwen2_vl_tiny``, fp32 on
the CPU), requests with images of different sizes, hence prompts of different lengths and
different M-RoPE positions, join a running batch at different steps and share 3 KV slots: every
output must equal ``model.generate(do_sample=False)`` on that request alone, from the inputs the
model's own processor and chat template make of it, stop token included.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("this transformers has no Qwen2.5-VL", allow_module_level=True)

from transformers import AutoProcessor  # noqa: E402

from ragws.engine.sequence import FinishReason, Sampling, SeqStatus  # noqa: E402
from ragws.models import load_ocr_runner  # noqa: E402
from ragws.models.qwen2_vl import (  # noqa: E402
    DEFAULT_MODES,
    QwenVlRunner,
)
from ragws.testing.got_tiny import synthetic_images  # noqa: E402

from .engine_loop import Request, drive  # noqa: E402
from .reference import generate_alone, vlm_chat  # noqa: E402

MAX_MODEL_LEN = 512  # the page prompt is ~200 tokens with up to 36 image tokens
ARCHS = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class Case:
    arch: str
    model_dir: Path
    runner: QwenVlRunner
    # (prompt ids, output ids); keyword arguments go to ``generate``
    generate: Callable[..., tuple[list[int], list[int]]]


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    return [np.array(image) for image in synthetic_images(n, seed=seed)]


@pytest.fixture(scope="module", params=ARCHS)
def case(request: pytest.FixtureRequest) -> Case:
    """The runner that ``load_ocr_runner`` picks for the checkpoint, and the reference: HF
    ``generate`` on one request alone, through a separately loaded model and processor."""
    arch = request.param
    model_dir: Path = request.getfixturevalue(f"{arch}_tiny_dir")
    runner = load_ocr_runner(str(model_dir), "cpu", num_slots=3, max_model_len=MAX_MODEL_LEN)
    assert isinstance(runner, QwenVlRunner)
    config = json.loads((model_dir / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    stops = sorted(runner.stop_ids)

    def generate(req: Request, **options: Any) -> tuple[list[int], list[int]]:
        messages = vlm_chat(config["architectures"][0], req.image, req.mode, req.prompt)
        return generate_alone(model, processor, messages, req.max_tokens, stops, **options)

    return Case(arch, model_dir, runner, generate)


def _runs_full(output: list[int], max_tokens: int, stops: frozenset[int]) -> bool:
    return len(output) == max_tokens and not stops & set(output)


def test_staggered_requests_match_solo_generate(case: Case) -> None:
    """8 requests (MinerU's text prompt on images of five sizes and a transposed one, the page
    prompt, a table with a prompt of its own) arrive at different steps into 3 slots: every
    output equals that request's solo ``generate``, and every prompt equals what the
    processor's chat template makes of the request."""
    images = _images(6)
    transposed = np.ascontiguousarray(images[0].transpose(1, 0, 2))
    # The tiny model's stop calibration (text prompt, images 0-5, 12 tokens) makes at least
    # two of these stop early and two run to the end: at least one of each among 0-4.
    requests = [
        Request(images[0], "text", 12, arrive=0),
        Request(transposed, "text", 12, arrive=0),  # same length, other positions
        Request(images[1], "text", 12, arrive=0),
        Request(images[2], "text", 12, arrive=1),
        Request(images[3], "text", 12, arrive=2),
        Request(images[4], "text", 12, arrive=4),
        Request(images[5], "page", 9, arrive=5),
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


def test_repetition_penalty_is_applied_as_generate_does(case: Case, tmp_path: Path) -> None:
    """Requests with a repetition penalty beside requests without, in one batch: each equals
    ``generate`` with its penalty (HF's processor over prompt and output), and the penalty
    changes what the model says. A checkpoint whose generation config has one makes it the
    default, as it is ``generate``'s."""
    images = _images(4, seed=5)
    requests = [
        Request(images[0], "text", 12, arrive=0, repetition_penalty=1.5),
        Request(images[1], "text", 12, arrive=0),
        Request(images[2], "table", 10, arrive=1, repetition_penalty=0.8),
        Request(images[3], "text", 12, arrive=2, repetition_penalty=1.5),
    ]
    run = drive(case.runner, requests, num_slots=3)
    changed = 0
    for seq, req in zip(run.seqs, requests, strict=True):
        penalty = {"repetition_penalty": req.repetition_penalty}
        assert seq.output_ids == case.generate(req, **penalty)[1], seq.seq_id
        changed += seq.output_ids != case.generate(req)[1][: len(seq.output_ids)]
    assert changed >= 1, "the penalty changed no output: the test shows nothing"

    penalized = tmp_path / "penalized"
    shutil.copytree(case.model_dir, penalized)
    config_path = penalized / "generation_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "repetition_penalty": 1.05}))
    runner = load_ocr_runner(str(penalized), "cpu", num_slots=1, max_model_len=MAX_MODEL_LEN)
    assert runner.repetition_penalty == 1.05 and case.runner.repetition_penalty == 1.0


def test_no_repeat_ngram_size_is_applied_as_generate_does(case: Case) -> None:
    """HF's no_repeat_ngram_size (MinerU's client asks 100 of vLLM) per request, beside
    requests without it and with a repetition penalty: each output equals ``generate`` with
    the same settings, and the guard changes what a looping random model says."""
    images = _images(4, seed=8)
    requests = [
        Request(images[0], "text", 16, arrive=0, no_repeat_ngram_size=1),  # no token twice
        Request(images[1], "text", 16, arrive=0),
        Request(images[2], "text", 16, arrive=0, no_repeat_ngram_size=2),
        Request(images[2], "table", 12, arrive=1, no_repeat_ngram_size=3),
        Request(images[3], "text", 16, arrive=2, no_repeat_ngram_size=2, repetition_penalty=1.2),
    ]
    run = drive(case.runner, requests, num_slots=3)
    changed = 0
    for seq, req in zip(run.seqs, requests, strict=True):
        options = {
            "no_repeat_ngram_size": req.no_repeat_ngram_size,
            "repetition_penalty": req.repetition_penalty,
        }
        assert seq.output_ids == case.generate(req, **options)[1], seq.seq_id
        changed += seq.output_ids != case.generate(req)[1][: len(seq.output_ids)]
        n = req.no_repeat_ngram_size
        if n:
            # No n-gram that ends in the output occurred before it (the prompt may repeat
            # itself: its image placeholders do).
            ids = seq.prompt_ids + seq.output_ids
            for end in range(len(seq.prompt_ids) + 1, len(ids) + 1):
                gram = ids[end - n : end]
                earlier = [ids[i : i + n] for i in range(end - n)]
                assert gram not in earlier, (seq.seq_id, end)
    assert changed >= 1, "the guard changed no output: the test shows nothing"


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
    default = DEFAULT_MODES[type(runner.model).__name__]
    assert runner.prepare(image, mode="format").prompt_ids == (
        runner.prepare(image, mode=default).prompt_ids
    )
    assert runner.prepare(image, mode="plain").prompt_ids == (
        runner.prepare(image, mode=default).prompt_ids
    )
    tokenizer = runner.tokenizer
    custom = tokenizer.decode(runner.prepare(image, mode="table", system="Be brief.").prompt_ids)
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert custom.endswith("<|vision_end|>\nTable Recognition:<|im_end|>\n<|im_start|>assistant\n")
    page = tokenizer.decode(runner.prepare(image, mode="page", prompt="Read it.").prompt_ids)
    assert "<|im_start|>user\nRead it.<|vision_start|>" in page  # olmOCR: the text first
    with pytest.raises(ValueError, match="mode"):
        runner.prepare(image, mode="markdown")
    with pytest.raises(ValueError, match="crop"):
        runner.prepare(image, mode="text", crop=True)
    with pytest.raises(ValueError, match="image markers"):
        runner.prepare(image, mode="text", prompt="<|image_pad|>")
    names = {tokenizer.convert_ids_to_tokens(i) for i in runner.stop_ids}
    assert names == {"<|im_end|>", "<|endoftext|>"}


def test_loader_picks_the_family_from_config_json(tmp_path: Path, got_tiny_dir: Path) -> None:
    from ragws.models import OCR_ARCHITECTURES, checkpoint_architecture

    assert checkpoint_architecture(str(got_tiny_dir)) == "GotOcr2ForConditionalGeneration"
    assert checkpoint_architecture("got-ocr2") == "GotOcr2ForConditionalGeneration"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert checkpoint_architecture(str(tmp_path)) == "Qwen2_5_VLForConditionalGeneration"
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlavaForConditionalGeneration"]})
    )
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration") as info:
        load_ocr_runner(str(tmp_path), "cpu", num_slots=1, max_model_len=64)
    assert all(name in str(info.value) for name in OCR_ARCHITECTURES)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_ocr_runner(str(tmp_path / "missing"), "cpu", num_slots=1, max_model_len=64)
