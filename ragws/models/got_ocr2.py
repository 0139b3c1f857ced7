"""GOT-OCR2: the model family behind ``--ocr-model got-ocr2``, on the slot runner.

:class:`GotOcr2` is what the family brings to :class:`~ragws.models.slot_runner.SlotRunner`
(see :class:`~ragws.models.slot_runner.SlotModel`): the processor and its prompts, the vision
tower and projector, the merge of image features into the prompt's embeddings, and the Qwen2
decoder (:mod:`ragws.models.text_decoder`) replayed over the checkpoint's own modules,
attending through the runner's KV slots.
:class:`GotOcr2Runner` is the slot runner over it, loaded from a checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragws.engine.runner import Tasks
from ragws.models.slot_runner import (
    CheckpointRunner,
    ModelUnavailableError,
    SlotAttention,
    generation_defaults,
)
from ragws.models.text_decoder import TextDecoder, freeze_tokenizer_settings

__all__ = [
    "HF_REPO",
    "HUB_SPEC",
    "MODES",
    "STOP_TOKENS",
    "TASK_PROMPTS",
    "GotOcr2",
    "GotOcr2Runner",
    "ModelUnavailableError",
    "OcrPrompt",
    "derive_image_tokens",
]

log = logging.getLogger(__name__)

#: What ``--ocr-model got-ocr2`` means: the transformers-format release of GOT-OCR 2.0.
HF_REPO = "stepfun-ai/GOT-OCR-2.0-hf"
HUB_SPEC = "got-ocr2"

#: Tokens that end an answer. GOT ends with ``<|im_end|>``; the real checkpoint's
#: ``generation_config`` lists only ``<|endoftext|>``, so the runner stops on both itself.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

#: Request modes and the processor's ``format`` flag: "OCR with format: " vs "OCR: ".
MODES = {"format": True, "plain": False}

#: GOT's own task prompts. A request's text equal to one of them (spacing aside) gets the
#: processor's prompt for that mode, token for token: what the ``ocr`` frame's ``mode`` gets.
TASK_PROMPTS = {"OCR:": "plain", "OCR with format:": "format"}


@dataclass(slots=True)
class OcrPrompt:
    """A prepared request (:class:`~ragws.engine.runner.Prepared`): the prompt and its image
    tiles. Stored as ``Sequence.image`` until the prefill, which sets it to None to free the
    pixels."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor  # (tiles, 3, H, W), already in the model dtype, on the CPU

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def _conv_out(size: int, conv: torch.nn.Conv2d) -> int:
    (kernel, _), (stride, _), (padding, _) = conv.kernel_size, conv.stride, conv.padding
    return (size + 2 * padding - kernel) // stride + 1


def derive_image_tokens(model: Any) -> int:
    """Image tokens per tile, from the loaded config and projector, not the processor's 256.

    The ViT patchifies ``image_size`` into a ``g × g`` grid (``g = image_size // patch_size``),
    the neck keeps it, and the projector's two stride-2 convolutions (kernel 3, padding 1) map
    ``g`` to ``ceil(g / 2)`` twice; the tokens are the final grid, flattened.
    """
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    projector = model.model.multi_modal_projector
    for conv in (projector.conv_upsampler1, projector.conv_upsampler2):
        side = _conv_out(side, conv)
    return side * side


class GotOcr2:
    """GOT-OCR2 as a :class:`~ragws.models.slot_runner.SlotModel`: processor, vision tower and
    projector, embedding merge, and the Qwen2 decoder over the runner's KV slots."""

    def __init__(self, spec: str, device: str = "cpu", *, vision_batch: int | None = None) -> None:
        """Load ``spec`` (``"got-ocr2"`` or a ``save_pretrained`` directory) onto ``device``.

        ``vision_batch`` caps the tiles per vision-tower call (None: all of a step's tiles on
        CUDA, 2 on CPU, where the global-attention layers make large batches slower per tile).
        """
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        kind = "cuda" if device.startswith("cuda") else "cpu"
        self.device = torch.device(device)
        # bf16 is what the checkpoint ships in; CPUs run it slowly (and fp32 is the reference).
        self.dtype = torch.bfloat16 if kind == "cuda" else torch.float32
        self.name = HUB_SPEC if spec == HUB_SPEC else Path(spec).resolve().name
        self.vision_batch = vision_batch or (None if kind == "cuda" else 2)
        self.model, self.processor = _load(spec, self.dtype, self.device)
        self.tokenizer = self.processor.tokenizer
        freeze_tokenizer_settings(self.tokenizer)

        vocab = self.tokenizer.get_vocab()
        self.stop_ids = frozenset(vocab[t] for t in STOP_TOKENS if t in vocab)
        if not self.stop_ids:
            raise ValueError(f"{spec}: the tokenizer has none of the stop tokens {STOP_TOKENS}")
        self.repetition_penalty, self.no_repeat_ngram_size = generation_defaults(
            self.model.generation_config
        )

        config = self.model.config
        self.image_token_id: int = config.image_token_id
        self.image_tokens = derive_image_tokens(self.model)
        # The processor inserts a fixed count (a class attribute, 256) unless told otherwise.
        self._processor_kwargs: dict[str, Any] = {}
        if self.processor.num_image_tokens != self.image_tokens:
            self._processor_kwargs["num_image_tokens"] = self.image_tokens

        self.decoder = TextDecoder.of(
            self.model.model.language_model, self.model.lm_head, config.text_config, spec
        )
        self.num_layers = self.decoder.num_layers
        self.num_heads = self.decoder.num_heads
        self.num_kv_heads = self.decoder.num_kv_heads
        self.head_dim = self.decoder.head_dim
        dtype = str(self.dtype).removeprefix("torch.")
        self.summary = (
            f"GOT-OCR2 {self.name} on {kind} ({dtype}): {self.image_tokens} image tokens per tile"
        )
        # "OCR with format" writes tables and formulas as markup; the rest reads as plain text.
        self.tasks = Tasks(
            "GotOcr2ForConditionalGeneration",
            modes=("format", "plain"),
            regions={"table": "format", "equation": "format"},
            default="plain",
        )

    def prepare(
        self,
        image: np.ndarray,
        *,
        mode: str = "format",
        crop: bool = False,
        prompt: str | None = None,
        system: str | None = None,
    ) -> OcrPrompt:
        """Turn one RGB ``H×W×3`` page into prompt ids and pixel values (worker pool, no GPU).

        ``prompt`` replaces GOT's task prompt ("OCR: ") in the user's turn, ``system`` the
        system turn's text; None keeps the processor's own. A prompt that is one of
        :data:`TASK_PROMPTS` is that mode's prompt. ValueError for text the model cannot take.

        Thread-safe: the processor keeps no per-call state, and the backend tokenizer's
        padding/truncation were cleared at load, so concurrent encodes only read it.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if system is None and prompt is not None and " ".join(prompt.split()) in TASK_PROMPTS:
            mode, prompt = TASK_PROMPTS[" ".join(prompt.split())], None
        text = None
        if prompt is not None or system is not None:
            text = self._chat_text(prompt, system, MODES[mode], crop)
        inputs = self.processor(
            images=image,
            text=text,
            format=MODES[mode],
            crop_to_patches=crop,
            return_tensors="pt",
            **self._processor_kwargs,
        )
        ids: list[int] = inputs["input_ids"][0].tolist()
        pixels = inputs["pixel_values"].to(self.dtype)
        if ids.count(self.image_token_id) != pixels.shape[0] * self.image_tokens:
            raise ValueError("the processor's image placeholders do not match the model's")
        return OcrPrompt(ids, pixels)

    def encode_images(self, prepared: list[OcrPrompt]) -> list[torch.Tensor]:
        """Vision tower + projector for all the requests' tiles, split back per request."""
        pixels = torch.cat([p.pixel_values for p in prepared]).to(self.device, self.dtype)
        got = self.model.model
        features = torch.cat(
            [
                got.multi_modal_projector(got.vision_tower(chunk).last_hidden_state)
                for chunk in pixels.split(self.vision_batch or len(pixels))
            ]
        )
        if features.shape[1] != self.image_tokens:
            raise RuntimeError(
                f"the projector gave {features.shape[1]} tokens per tile, not {self.image_tokens}"
            )
        return [f.flatten(0, 1) for f in features.split([p.tiles for p in prepared])]

    def embed(self, ids: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings, with the image features written over the image placeholders."""
        return self.decoder.embed(ids, images, self.image_token_id)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention: SlotAttention
    ) -> torch.Tensor:
        """The Qwen2 decoder layers over the loaded modules; hidden states before the norm."""
        return self.decoder.forward(embeds, positions, attention)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(hidden)

    # --- internals -------------------------------------------------------------------------

    def _chat_text(self, prompt: str | None, system: str | None, fmt: bool, crop: bool) -> str:
        """The conversation the processor builds for its own prompts (the checkpoint has no
        chat template; the processor lays it out), with the request's texts in it."""
        p = self.processor
        placeholders = (p.image_token, p.img_start_token, p.img_end_token)
        for part in (prompt or "", system or ""):
            if any(token in part for token in placeholders):
                raise ValueError(f"the text may not contain the image markers {placeholders}")
        system_turn = p.system_query if system is None else f"system\n{system}"
        query = prompt
        if query is None:  # the processor's own, spaces included
            query = f" OCR{' with format' * fmt}{' upon the patch reference' * crop}: "
        return (
            f"{p.message_start_token}{system_turn}{p.message_end_token}"
            f"{p.message_start_token}user\n{p.img_start_token}{p.image_token}{p.img_end_token}"
            f"\n{query}{p.message_end_token}{p.message_start_token}assistant\n"
        )


class GotOcr2Runner(CheckpointRunner):
    """The slot runner over :class:`GotOcr2`: what ``--ocr-model got-ocr2`` loads."""

    FAMILY = GotOcr2
    family: GotOcr2

    @property
    def image_tokens(self) -> int:
        """Image tokens per tile."""
        return self.family.image_tokens

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id


def _load(spec: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """Load model and processor with the calls a real checkpoint uses."""
    from transformers import AutoProcessor, GotOcr2ForConditionalGeneration

    if spec == HUB_SPEC:
        source = HF_REPO
    else:
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"not a GOT-OCR2 checkpoint directory (no config.json): {path}; "
                f"use {HUB_SPEC!r} for {HF_REPO} from the Hugging Face hub"
            )
        source = str(path)
    try:
        model = GotOcr2ForConditionalGeneration.from_pretrained(source, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source)
    except Exception as exc:
        if spec != HUB_SPEC:
            raise
        raise ModelUnavailableError(
            f"could not load {HF_REPO!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). Without access to the hub, download the repo elsewhere (e.g. "
            f"`huggingface-cli download {HF_REPO} --local-dir DIR`) and pass that local "
            "directory instead of 'got-ocr2'."
        ) from exc
    model.to(device).eval()
    return model, processor
