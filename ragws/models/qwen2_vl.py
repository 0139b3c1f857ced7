"""Qwen2-VL and Qwen2.5-VL: MinerU2.5, olmOCR-2, Nanonets-OCR2 and RolmOCR, on the slot runner.

:class:`QwenVl` is what the family brings to :class:`~ragws.models.slot_runner.SlotRunner` (see
:class:`~ragws.models.slot_runner.SlotModel`), for both architectures: the checkpoint's own
processor and chat template, its vision tower (one call per request: images of any size,
patches at native resolution), the merge of image features at ``<|image_pad|>``, and the Qwen2
decoder (:mod:`ragws.models.text_decoder`) replayed over the checkpoint's modules.

Positions (M-RoPE), loading, encoding and the decoder are the M-RoPE families' shared half,
:mod:`ragws.models.mrope_vlm`.

Prompts: a request's ``mode`` picks an instruction (:data:`MODES`; MinerU2.5's block prompts and
an olmOCR-style page prompt), its ``prompt`` replaces the instruction's text, its ``system`` the
system turn (MinerU's client sends "You are a helpful assistant.", which the template also adds
when there is none). The engine's generic modes ``format`` and ``plain`` ask for the
checkpoint's default: ``text`` for Qwen2-VL (MinerU2.5), ``page`` for Qwen2.5-VL.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from ragws.engine.runner import Tasks
from ragws.models.mrope_vlm import GENERIC_MODES, MRopePrompt, MRopeVlm, MRopeVlmRunner

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODES",
    "GENERIC_MODES",
    "MODES",
    "OLMOCR_PAGE_PROMPT",
    "STOP_TOKENS",
    "SYSTEM_PROMPT",
    "QwenVl",
    "QwenVlPrompt",
    "QwenVlRunner",
    "Task",
]

#: The architectures this module loads (``config.json`` ``architectures``), and their names.
ARCHITECTURES = MappingProxyType(
    {
        "Qwen2VLForConditionalGeneration": "Qwen2-VL",
        "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
    }
)

#: The system turn MinerU's client sends (and the Qwen chat template's own default).
SYSTEM_PROMPT = "You are a helpful assistant."

#: Tokens that end an answer, besides the generation config's ``eos_token_id``.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

#: olmOCR's page prompt (``build_no_anchoring_v4_yaml_prompt``): plain text of one page, with
#: LaTeX equations, HTML tables and a YAML front matter.
OLMOCR_PAGE_PROMPT = (
    "Attached is one page of a document that you must process. Just return the plain text "
    "representation of this document as if you were reading it naturally. Convert equations to "
    "LateX and tables to HTML.\n"
    "If there are any figures or charts, label them with the following markdown syntax "
    "![Alt text describing the contents of the figure](page_startx_starty_width_height.png)\n"
    "Return your output as markdown, with a front matter section on top specifying values for "
    "the primary_language, is_rotation_valid, rotation_correction, is_table, and is_diagram "
    "parameters."
)


@dataclass(frozen=True, slots=True)
class Task:
    """What a mode asks: the instruction, and whether it comes before the image in the user's
    turn (olmOCR's layout) or after it (MinerU's)."""

    instruction: str
    text_first: bool = False


#: Request modes. MinerU2.5's prompts for a block's crop (the leading newline is theirs), and a
#: whole page the olmOCR way.
MODES: dict[str, Task] = {
    "text": Task("\nText Recognition:"),
    "table": Task("\nTable Recognition:"),
    "formula": Task("\nFormula Recognition:"),
    "page": Task(OLMOCR_PAGE_PROMPT, text_first=True),
}

#: The mode of the generic :data:`GENERIC_MODES`, per architecture.
DEFAULT_MODES = {
    "Qwen2VLForConditionalGeneration": "text",
    "Qwen2_5_VLForConditionalGeneration": "page",
}

#: Markers the request's texts may not contain: they would add image placeholders.
_VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


QwenVlPrompt = MRopePrompt  # a prepared request


class QwenVl(MRopeVlm):
    """Qwen2-VL or Qwen2.5-VL as a :class:`~ragws.models.slot_runner.SlotModel`: MinerU's block
    tasks and olmOCR's page task on the M-RoPE families' shared half."""

    ARCHITECTURES = ARCHITECTURES
    STOP_TOKENS = STOP_TOKENS
    MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

    def __init__(self, spec: str, device: str = "cpu", vision_batch: int | None = None) -> None:
        """Load ``spec`` (a ``save_pretrained`` directory, or a hub id) onto ``device``."""
        super().__init__(spec, device, vision_batch)
        self.default_mode = DEFAULT_MODES[self.architecture]
        if self.default_mode == "page":
            # olmOCR-2, Nanonets-OCR2, RolmOCR read whole pages (page level): parse sends
            # them pages, and a region it must read (one without a text layer on a
            # born-digital page) with the page task too.
            self.tasks = Tasks(
                self.architecture, modes=(*GENERIC_MODES, *MODES), default="page", page="page"
            )
        else:
            # MinerU2.5 reads layout regions (element level): each with its type's task.
            self.tasks = Tasks(
                self.architecture,
                modes=(*GENERIC_MODES, *MODES),
                regions={"table": "table", "equation": "formula"},
                default="text",
            )
        self.summary = self.describe(self.default_mode)

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

        ``mode`` is one of :data:`MODES` (or :data:`GENERIC_MODES`: the default mode),
        ``prompt`` replaces its instruction and ``system`` the system turn. ValueError for
        options the model cannot take: an unknown mode, ``crop`` (the model reads an image
        whole, at its own resolution), texts with image markers.

        Thread-safe: the processor keeps no per-call state, the tokenizer's padding and
        truncation were cleared at load, and ``get_rope_index`` only reads the config.
        """
        if mode in GENERIC_MODES:
            mode = self.default_mode
        if mode not in MODES:
            raise ValueError(
                f"mode must be one of {sorted(MODES)} (or {' or '.join(GENERIC_MODES)}: "
                f"{self.default_mode!r}), got {mode!r}"
            )
        task = MODES[mode]
        instruction = task.instruction if prompt is None else prompt
        system = SYSTEM_PROMPT if system is None else system
        self._check(crop, instruction, system)
        content: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": instruction}]
        if task.text_first:
            content.reverse()
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": content},
        ]
        return self._prompt(messages, image)


class QwenVlRunner(MRopeVlmRunner):
    """The slot runner over :class:`QwenVl`: what ``--ocr-model DIR`` loads for a Qwen2-VL or
    Qwen2.5-VL checkpoint."""

    FAMILY = QwenVl
    family: QwenVl
