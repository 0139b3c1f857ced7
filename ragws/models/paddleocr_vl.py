"""PaddleOCR-VL on the slot runner.

:class:`PaddleOcrVl` is what the family brings to :class:`~ragws.models.slot_runner.SlotRunner`
(see :class:`~ragws.models.slot_runner.SlotModel`): the checkpoint's own processor and chat
template, its SigLIP-NaViT vision tower and 2 × 2-merging projector (one call per request:
images of any size, patches at native resolution), the merge of image features at the image
placeholder, and the ERNIE-4.5 decoder (:mod:`ragws.models.text_decoder`: the same layer as
Qwen2's, without biases, with an explicit head_dim and grouped KV heads) replayed over the
checkpoint's modules.

Positions (M-RoPE), loading, encoding and the decoder are the M-RoPE families' shared half,
:mod:`ragws.models.mrope_vlm`, as for Qwen2-VL.

Prompts: a request's ``mode`` picks one of PaddleOCR-VL's task prompts (:data:`MODES`), its
``prompt`` replaces that text, its ``system`` adds a system turn (PaddleOCR-VL's clients send
none). The user's turn is the image, then the text, through the checkpoint's chat template. The
engine's generic modes ``format`` and ``plain`` ask for ``text``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np

from ragws.engine.runner import Tasks
from ragws.models.mrope_vlm import GENERIC_MODES, MRopePrompt, MRopeVlm, MRopeVlmRunner

__all__ = [
    "ARCHITECTURE",
    "DEFAULT_MODE",
    "GENERIC_MODES",
    "MODES",
    "STOP_TOKENS",
    "PaddleOcrVl",
    "PaddleOcrVlPrompt",
    "PaddleOcrVlRunner",
]

#: The architecture this module loads (``config.json`` ``architectures``), and its name.
ARCHITECTURE = "PaddleOCRVLForConditionalGeneration"
ARCHITECTURES = MappingProxyType({ARCHITECTURE: "PaddleOCR-VL"})

#: Tokens that end an answer, besides the generation config's ``eos_token_id``.
STOP_TOKENS = ("</s>",)

#: Request modes: PaddleOCR-VL's task prompts (no leading newline, unlike MinerU's).
MODES: dict[str, str] = {
    "text": "OCR:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
    "chart": "Chart Recognition:",
}

#: The mode of the generic :data:`GENERIC_MODES`.
DEFAULT_MODE = "text"

PaddleOcrVlPrompt = MRopePrompt  # a prepared request


class PaddleOcrVl(MRopeVlm):
    """PaddleOCR-VL as a :class:`~ragws.models.slot_runner.SlotModel`: its task prompts on the
    M-RoPE families' shared half (its decoder is ERNIE-4.5's: no biases, an explicit head_dim,
    grouped KV heads)."""

    ARCHITECTURES = ARCHITECTURES
    STOP_TOKENS = STOP_TOKENS
    MARKERS = ("<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>", "<|video_pad|>")

    def __init__(self, spec: str, device: str = "cpu", vision_batch: int | None = None) -> None:
        """Load ``spec`` (a ``save_pretrained`` directory, or a hub id) onto ``device``."""
        super().__init__(spec, device, vision_batch)
        self.tasks = Tasks(
            ARCHITECTURE,
            modes=(*GENERIC_MODES, *MODES),
            regions={"table": "table", "equation": "formula"},
            default=DEFAULT_MODE,
        )
        self.summary = self.describe(DEFAULT_MODE)

    def prepare(
        self,
        image: np.ndarray,
        *,
        mode: str = "format",
        crop: bool = False,
        prompt: str | None = None,
        system: str | None = None,
    ) -> MRopePrompt:
        """Turn one RGB ``H×W×3`` image into prompt ids, patches and M-RoPE positions (worker
        pool, no GPU).

        ``mode`` is one of :data:`MODES` (or :data:`GENERIC_MODES`: :data:`DEFAULT_MODE`),
        ``prompt`` replaces its text and ``system`` adds a system turn. ValueError for options
        the model cannot take: an unknown mode, ``crop`` (the model reads an image whole, at
        its own resolution), texts with image markers.

        Thread-safe: the processor keeps no per-call state, the tokenizer's padding and
        truncation were cleared at load, and ``get_rope_index`` only reads the config.
        """
        if mode in GENERIC_MODES:
            mode = DEFAULT_MODE
        if mode not in MODES:
            raise ValueError(
                f"mode must be one of {sorted(MODES)} (or {' or '.join(GENERIC_MODES)}: "
                f"{DEFAULT_MODE!r}), got {mode!r}"
            )
        instruction = MODES[mode] if prompt is None else prompt
        self._check(crop, instruction, system or "")
        messages: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": instruction}],
            }
        ]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return self._prompt(messages, image)


class PaddleOcrVlRunner(MRopeVlmRunner):
    """The slot runner over :class:`PaddleOcrVl`: what ``--ocr-model DIR`` loads for a
    PaddleOCR-VL checkpoint."""

    FAMILY = PaddleOcrVl
    family: PaddleOcrVl
