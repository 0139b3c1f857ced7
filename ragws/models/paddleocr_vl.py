"""PaddleOCR-VL on the slot runner.

:class:`PaddleOcrVl` is what the family brings to :class:`~ragws.models.slot_runner.SlotRunner`
(see :class:`~ragws.models.slot_runner.SlotModel`): the checkpoint's own processor and chat
template, its SigLIP-NaViT vision tower and 2 × 2-merging projector (one call per request:
images of any size, patches at native resolution), the merge of image features at the image
placeholder, and the ERNIE-4.5 decoder (:mod:`ragws.models.text_decoder`: the same layer as
Qwen2's, without biases, with an explicit head_dim and grouped KV heads) replayed over the
checkpoint's modules.

Positions (M-RoPE), as for Qwen2-VL (:mod:`ragws.models.qwen2_vl`): :meth:`PaddleOcrVl.prepare`
computes a prompt's ``(3, L)`` positions once with the model's own ``get_rope_index`` (from the
processor's ``mm_token_type_ids``), and the offset ``delta`` at which every generated token sits
(token ``p`` of the cache has rotary position ``p + delta`` on all three axes, as in
``generate``); the runner keeps both (``rope_positions``, ``rope_delta``).

Prompts: a request's ``mode`` picks one of PaddleOCR-VL's task prompts (:data:`MODES`), its
``prompt`` replaces that text, its ``system`` adds a system turn (PaddleOCR-VL's clients send
none). The user's turn is the image, then the text, through the checkpoint's chat template. The
engine's generic modes ``format`` and ``plain`` ask for ``text``.
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
    "ARCHITECTURE",
    "DEFAULT_MODE",
    "GENERIC_MODES",
    "MODES",
    "STOP_TOKENS",
    "PaddleOcrVl",
    "PaddleOcrVlPrompt",
    "PaddleOcrVlRunner",
]

#: The architecture this module loads (``config.json`` ``architectures``).
ARCHITECTURE = "PaddleOCRVLForConditionalGeneration"

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

#: The engine's model-independent modes (GOT's): each asks for :data:`DEFAULT_MODE`.
GENERIC_MODES = ("format", "plain")

#: Markers the request's texts may not contain: they would add image placeholders.
_IMAGE_MARKERS = ("<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>", "<|video_pad|>")


@dataclass(slots=True)
class PaddleOcrVlPrompt:
    """A prepared request (:class:`~ragws.engine.runner.Prepared`): the prompt, its image's
    patches and their grid, and its M-RoPE positions. Stored as ``Sequence.image`` until the
    prefill, which sets it to None to free the pixels."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor  # (patches, channels, patch, patch), model dtype, CPU
    image_grid_thw: torch.Tensor  # (images, 3): the patch grid of each image
    rope_positions: torch.Tensor  # (3, L): the prompt's rotary positions
    rope_delta: int  # a generated token at cache position p has rotary position p + delta


class PaddleOcrVl:
    """PaddleOCR-VL as a :class:`~ragws.models.slot_runner.SlotModel`: processor and chat
    template, vision tower and projector, embedding merge, and the decoder with M-RoPE."""

    def __init__(self, spec: str, device: str = "cpu") -> None:
        """Load ``spec`` (a ``save_pretrained`` directory, or a hub id) onto ``device``."""
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        kind = "cuda" if device.startswith("cuda") else "cpu"
        self.device = torch.device(device)
        # bf16 is what the checkpoint ships in; CPUs run it slowly (and fp32 is the reference).
        self.dtype = torch.bfloat16 if kind == "cuda" else torch.float32
        local = Path(spec).expanduser()
        self.name = local.resolve().name if local.is_dir() else spec
        self.model, self.processor = _load(spec, self.dtype, self.device)
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
            f"PaddleOCR-VL {self.name} on {kind} ({dtype}): {low}..{high} image tokens per "
            f"image, default mode {DEFAULT_MODE!r}"
        )
        self.tasks = Tasks(
            "PaddleOCRVLForConditionalGeneration",
            modes=(*GENERIC_MODES, *MODES),
            regions={"table": "table", "equation": "formula"},
            default="text",
        )

    def prepare(
        self,
        image: np.ndarray,
        *,
        mode: str = "format",
        crop: bool = False,
        prompt: str | None = None,
        system: str | None = None,
    ) -> PaddleOcrVlPrompt:
        """Turn one RGB ``H×W×3`` image into prompt ids, patches and M-RoPE positions (worker
        pool, no GPU).

        ``mode`` is one of :data:`MODES` (or :data:`GENERIC_MODES`: :data:`DEFAULT_MODE`),
        ``prompt`` replaces its text and ``system`` adds a system turn. ValueError for options
        the model cannot take: an unknown mode, ``crop`` (the model reads an image whole, at
        its own resolution), texts with image markers.

        Thread-safe: the processor keeps no per-call state, the tokenizer's padding and
        truncation were cleared at load, and ``get_rope_index`` only reads the config.
        """
        if crop:
            raise ValueError(
                "crop: PaddleOCR-VL reads an image whole, at its own resolution; it has no tiles"
            )
        if mode in GENERIC_MODES:
            mode = DEFAULT_MODE
        if mode not in MODES:
            raise ValueError(
                f"mode must be one of {sorted(MODES)} (or {' or '.join(GENERIC_MODES)}: "
                f"{DEFAULT_MODE!r}), got {mode!r}"
            )
        instruction = MODES[mode] if prompt is None else prompt
        for part in (instruction, system or ""):
            if any(marker in part for marker in _IMAGE_MARKERS):
                raise ValueError(f"the text may not contain the image markers {_IMAGE_MARKERS}")
        messages: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": instruction}],
            }
        ]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
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
        return PaddleOcrVlPrompt(
            prompt_ids=ids[0].tolist(),
            pixel_values=inputs["pixel_values"].to(self.dtype),
            image_grid_thw=grid,
            rope_positions=positions[:, 0],
            rope_delta=int(delta[0, 0]),
        )

    def encode_images(self, prepared: list[PaddleOcrVlPrompt]) -> list[torch.Tensor]:
        """The vision tower and projector, one request at a time (as ``generate`` runs it):
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
        """Token embeddings, with the image features written over the image placeholders."""
        return self.decoder.embed(ids, images, self.image_token_id)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention: SlotAttention
    ) -> torch.Tensor:
        """The decoder layers at M-RoPE ``positions``: ``(3, B, L)`` for a prompt, or ``(B, L)``
        shared by the three axes; hidden states before the final norm."""
        return self.decoder.forward(embeds, positions, attention)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(hidden)


class PaddleOcrVlRunner(SlotRunner):
    """The slot runner over :class:`PaddleOcrVl`: what ``--ocr-model DIR`` loads for a
    PaddleOCR-VL checkpoint."""

    family: PaddleOcrVl

    def __init__(
        self,
        spec: str,
        device: str = "cpu",
        *,
        num_slots: int = 16,
        max_model_len: int = 4096,
        kv_budget_bytes: int | None = None,
    ) -> None:
        """Load ``spec`` onto ``device`` (see :class:`PaddleOcrVl`) with a KV cache of
        ``num_slots`` slots of ``max_model_len`` tokens, fewer if ``kv_budget_bytes`` holds
        fewer (see :class:`~ragws.models.slot_runner.SlotRunner`)."""
        super().__init__(
            PaddleOcrVl(spec, device),
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
    """The generation config's end-of-sequence ids, and :data:`STOP_TOKENS` the vocabulary
    has."""
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
    """Load model and processor with the calls a real checkpoint uses: the model class and the
    checkpoint's own processor."""
    import transformers

    from ragws.models import checkpoint_architecture

    architecture = checkpoint_architecture(spec)
    if architecture != ARCHITECTURE:
        raise ValueError(f"{spec}: {architecture!r} is not {ARCHITECTURE}")
    path = Path(spec).expanduser()
    local = path.is_dir()
    source = str(path) if local else spec
    try:
        model = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(
            source, dtype=dtype
        )
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
