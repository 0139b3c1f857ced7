"""Qwen2-VL and Qwen2.5-VL: MinerU2.5, olmOCR-2, Nanonets-OCR2 and RolmOCR, on the slot runner.

:class:`QwenVl` is what the family brings to :class:`~ragws.models.slot_runner.SlotRunner` (see
:class:`~ragws.models.slot_runner.SlotModel`), for both architectures: the checkpoint's own
processor and chat template, its vision tower (one call per request: images of any size,
patches at native resolution), the merge of image features at ``<|image_pad|>``, and the Qwen2
decoder (:mod:`ragws.models.text_decoder`) replayed over the checkpoint's modules.

Positions (M-RoPE): the decoder's rotary embedding has three axes (time, row, column). Text
tokens advance all three together; an image's tokens share the position where the image starts
on the time axis and count rows and columns on the other two, and the text after the image
resumes at ``start + max(rows, columns)``. :meth:`QwenVl.prepare` computes a prompt's
``(3, L)`` positions once, with the model's own ``get_rope_index``, and the offset ``delta``
(``max position + 1 - L``) at which every generated token sits: token ``p`` of the cache has
rotary position ``p + delta`` on all three axes, as in ``generate``. The runner keeps both
(``rope_positions``, ``rope_delta`` on the prepared request).

Prompts: a request's ``mode`` picks an instruction (:data:`MODES`; MinerU2.5's block prompts and
an olmOCR-style page prompt), its ``prompt`` replaces the instruction's text, its ``system`` the
system turn (MinerU's client sends "You are a helpful assistant.", which the template also adds
when there is none). The engine's generic modes ``format`` and ``plain`` ask for the
checkpoint's default: ``text`` for Qwen2-VL (MinerU2.5), ``page`` for Qwen2.5-VL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragws.engine.runner import Tasks
from ragws.models.slot_runner import ModelUnavailableError, SlotAttention, SlotRunner
from ragws.models.text_decoder import TextDecoder, freeze_tokenizer_settings

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
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "Qwen2-VL",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
}

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

#: The engine's model-independent modes (GOT's): each asks for the checkpoint's default mode.
GENERIC_MODES = ("format", "plain")

#: Markers the request's texts may not contain: they would add image placeholders.
_VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


@dataclass(slots=True)
class QwenVlPrompt:
    """A prepared request (:class:`~ragws.engine.runner.Prepared`): the prompt, its image's
    patches and their grid, and its M-RoPE positions. Stored as ``Sequence.image`` until the
    prefill, which sets it to None to free the pixels."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor  # (patches, channels × temporal × patch²), model dtype, CPU
    image_grid_thw: torch.Tensor  # (images, 3): the patch grid of each image
    rope_positions: torch.Tensor  # (3, L): the prompt's rotary positions
    rope_delta: int  # a generated token at cache position p has rotary position p + delta


class QwenVl:
    """Qwen2-VL or Qwen2.5-VL as a :class:`~ragws.models.slot_runner.SlotModel`: processor and
    chat template, vision tower, embedding merge, and the Qwen2 decoder with M-RoPE."""

    def __init__(self, spec: str, device: str = "cpu") -> None:
        """Load ``spec`` (a ``save_pretrained`` directory, or a hub id) onto ``device``."""
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        kind = "cuda" if device.startswith("cuda") else "cpu"
        self.device = torch.device(device)
        # bf16 is what the checkpoints ship in; CPUs run it slowly (and fp32 is the reference).
        self.dtype = torch.bfloat16 if kind == "cuda" else torch.float32
        local = Path(spec).expanduser()
        self.name = local.resolve().name if local.is_dir() else spec
        self.model, self.processor = _load(spec, self.dtype, self.device)
        self.architecture: str = type(self.model).__name__
        self.default_mode = DEFAULT_MODES[self.architecture]
        # MinerU2.5 reads layout regions (element level): each with its type's task.
        self.tasks = Tasks(
            self.architecture,
            modes=(*GENERIC_MODES, *MODES),
            regions={"table": "table", "equation": "formula"},
            default="text",
        )
        self.tokenizer = self.processor.tokenizer
        freeze_tokenizer_settings(self.tokenizer)

        config = self.model.config
        self.image_token_id: int = config.image_token_id
        self.merge_size: int = config.vision_config.spatial_merge_size
        self.stop_ids = _stop_ids(self.tokenizer, self.model.generation_config)
        if not self.stop_ids:
            raise ValueError(f"{spec}: the tokenizer has none of the stop tokens {STOP_TOKENS}")

        self.decoder = TextDecoder.of(
            self.model.model.language_model, self.model.lm_head, config.text_config, spec
        )
        self.num_layers = self.decoder.num_layers
        self.num_kv_heads = self.decoder.num_kv_heads
        self.head_dim = self.decoder.head_dim
        dtype = str(self.dtype).removeprefix("torch.")
        low, high = _image_token_range(self.processor.image_processor)
        self.summary = (
            f"{ARCHITECTURES[self.architecture]} {self.name} on {kind} ({dtype}): "
            f"{low}..{high} image tokens per image, default mode {self.default_mode!r}"
        )

    def prepare(
        self,
        image: np.ndarray,
        *,
        mode: str = "format",
        crop: bool = False,
        prompt: str | None = None,
        system: str | None = None,
    ) -> QwenVlPrompt:
        """Turn one RGB ``H×W×3`` image into prompt ids, patches and M-RoPE positions (worker
        pool, no GPU).

        ``mode`` is one of :data:`MODES` (or :data:`GENERIC_MODES`: the default mode),
        ``prompt`` replaces its instruction and ``system`` the system turn. ValueError for
        options the model cannot take: an unknown mode, ``crop`` (the model reads an image
        whole, at its own resolution), texts with image markers.

        Thread-safe: the processor keeps no per-call state, the tokenizer's padding and
        truncation were cleared at load, and ``get_rope_index`` only reads the config.
        """
        if crop:
            raise ValueError(
                f"crop: {ARCHITECTURES[self.architecture]} reads an image whole, at its own "
                "resolution; it has no tiles"
            )
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
        for part in (instruction, system):
            if any(marker in part for marker in _VISION_MARKERS):
                raise ValueError(f"the text may not contain the image markers {_VISION_MARKERS}")
        content: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": instruction}]
        if task.text_first:
            content.reverse()
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": content},
        ]
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
        placeholders = int((ids == self.image_token_id).sum())
        if placeholders != int(grid.prod(-1).sum()) // self.merge_size**2:
            raise ValueError("the processor's image placeholders do not match the model's")
        positions, delta = self.model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid
        )
        return QwenVlPrompt(
            prompt_ids=ids[0].tolist(),
            pixel_values=inputs["pixel_values"].to(self.dtype),
            image_grid_thw=grid,
            rope_positions=positions[:, 0],
            rope_delta=int(delta[0, 0]),
        )

    def encode_images(self, prepared: list[QwenVlPrompt]) -> list[torch.Tensor]:
        """The vision tower and merger, one request at a time (as ``generate`` runs it):
        ``(image tokens, hidden)`` per request."""
        vl = self.model.model
        features = []
        for p in prepared:
            out = vl.get_image_features(
                p.pixel_values.to(self.device, self.dtype),
                p.image_grid_thw.to(self.device),
                return_dict=True,
            )
            features.append(torch.cat(out.pooler_output))
        return features

    def embed(self, ids: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings, with the image features written over ``<|image_pad|>``."""
        return self.decoder.embed(ids, images, self.image_token_id)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention: SlotAttention
    ) -> torch.Tensor:
        """The Qwen2 decoder layers at M-RoPE ``positions``: ``(3, B, L)`` for a prompt, or
        ``(B, L)`` shared by the three axes; hidden states before the final norm."""
        return self.decoder.forward(embeds, positions, attention)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(hidden)


class QwenVlRunner(SlotRunner):
    """The slot runner over :class:`QwenVl`: what ``--ocr-model DIR`` loads for a Qwen2-VL or
    Qwen2.5-VL checkpoint."""

    family: QwenVl

    def __init__(
        self,
        spec: str,
        device: str = "cpu",
        *,
        num_slots: int = 16,
        max_model_len: int = 4096,
        kv_budget_bytes: int | None = None,
    ) -> None:
        """Load ``spec`` onto ``device`` (see :class:`QwenVl`) with a KV cache of ``num_slots``
        slots of ``max_model_len`` tokens, fewer if ``kv_budget_bytes`` holds fewer (see
        :class:`~ragws.models.slot_runner.SlotRunner`)."""
        super().__init__(
            QwenVl(spec, device),
            num_slots=num_slots,
            max_model_len=max_model_len,
            kv_budget_bytes=kv_budget_bytes,
        )

    @property
    def model(self) -> Any:
        """The loaded transformers model."""
        return self.family.model

    @property
    def processor(self) -> Any:
        return self.family.processor


def _stop_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """The generation config's end-of-sequence ids, and :data:`STOP_TOKENS` the vocabulary has
    (checkpoints' generation configs do not all list ``<|im_end|>``)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in STOP_TOKENS if token in vocab)
    return frozenset(ids)


def _image_token_range(image_processor: Any) -> tuple[int, int]:
    """Fewest and most image tokens of one image, from the processor's pixel bounds."""
    size = getattr(image_processor, "size", None) or {}
    side = image_processor.patch_size * image_processor.merge_size
    low = size.get("shortest_edge") or getattr(image_processor, "min_pixels", 0) or 0
    high = size.get("longest_edge") or getattr(image_processor, "max_pixels", 0) or 0
    return low // side**2, high // side**2


def _load(spec: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """Load model and processor with the calls a real checkpoint uses: the class its config
    names, and its own processor."""
    import transformers

    from ragws.models import checkpoint_architecture

    architecture = checkpoint_architecture(spec)
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{spec}: {architecture!r} is not a Qwen2-VL architecture ({', '.join(ARCHITECTURES)})"
        )
    path = Path(spec).expanduser()
    local = path.is_dir()
    source = str(path) if local else spec
    try:
        model = getattr(transformers, architecture).from_pretrained(source, dtype=dtype)
        processor = transformers.AutoProcessor.from_pretrained(source)
    except Exception as exc:
        if local:
            raise
        raise ModelUnavailableError(
            f"could not load {spec!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Without access to the hub, download it elsewhere (e.g. `huggingface-cli download "
            f"{spec} --local-dir DIR`) and pass that local directory instead."
        ) from exc
    model.to(device).eval()
    return model, processor
