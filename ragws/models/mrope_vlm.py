"""What the M-RoPE families (Qwen2-VL, Qwen2.5-VL, PaddleOCR-VL) share on the slot runner.

All three are a NaViT-style vision tower whose image tokens replace the prompt's image
placeholder, and a decoder with three-axis rotary positions (M-RoPE). :class:`MRopeVlm` does,
for each: load the checkpoint with the class its ``config.json`` names and its own processor;
turn a chat (the family builds the messages) into prompt ids, patches and positions through the
processor's chat template; encode a request's image with the model's own
``get_image_features``; merge the features; replay the decoder (:mod:`ragws.models.text_decoder`).

Positions: the decoder's rotary embedding has three axes (time, row, column). Text tokens
advance all three together; an image's tokens share the position where the image starts on the
time axis and count rows and columns on the other two, and the text after the image resumes at
``start + max(rows, columns)``. A prompt's ``(3, L)`` positions are computed once, with the
model's own ``get_rope_index``, with the offset ``delta`` (``max position + 1 - L``) at which
every generated token sits: token ``p`` of the cache has rotary position ``p + delta`` on all
three axes, as in ``generate``. The runner keeps both (``rope_positions``, ``rope_delta``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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

#: The engine's model-independent modes (GOT's): each asks for the checkpoint's default task.
GENERIC_MODES = ("format", "plain")


@dataclass(slots=True)
class MRopePrompt:
    """A prepared request (:class:`~ragws.engine.runner.Prepared`): the prompt, its image's
    patches and their grid, and its M-RoPE positions. Stored as ``Sequence.image`` until the
    prefill, which sets it to None to free the pixels."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor  # the processor's patches, model dtype, CPU
    image_grid_thw: torch.Tensor  # (images, 3): the patch grid of each image
    rope_positions: torch.Tensor  # (3, L): the prompt's rotary positions
    rope_delta: int  # a generated token at cache position p has rotary position p + delta


class MRopeVlm:
    """The shared half of an M-RoPE family's :class:`~ragws.models.slot_runner.SlotModel`.

    A family sets :attr:`ARCHITECTURES`, :attr:`STOP_TOKENS` and :attr:`MARKERS`, builds
    :attr:`tasks` and a :attr:`summary`, and writes ``prepare`` (its modes and messages) on
    :meth:`_prompt`."""

    #: The architectures the family loads (``config.json`` ``architectures``) → display name.
    ARCHITECTURES: ClassVar[Mapping[str, str]]
    #: Tokens that end an answer, besides the generation config's ``eos_token_id``.
    STOP_TOKENS: ClassVar[tuple[str, ...]]
    #: Markers a request's texts may not contain: they would add image placeholders.
    MARKERS: ClassVar[tuple[str, ...]]

    tasks: Tasks
    summary: str

    def __init__(self, spec: str, device: str = "cpu", vision_batch: int | None = None) -> None:
        """Load ``spec`` (a ``save_pretrained`` directory, or a hub id) onto ``device``;
        ``vision_batch`` caps the images per vision-tower call (None: a step's all)."""
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.kind = "cuda" if device.startswith("cuda") else "cpu"
        self.device = torch.device(device)
        # bf16 is what the checkpoints ship in; CPUs run it slowly (and fp32 is the reference).
        self.dtype = torch.bfloat16 if self.kind == "cuda" else torch.float32
        local = Path(spec).expanduser()
        self.name = local.resolve().name if local.is_dir() else spec
        self.vision_batch = vision_batch
        self.model, self.processor = load(spec, self.dtype, self.device, self.ARCHITECTURES)
        self.architecture: str = type(self.model).__name__
        self.display_name = self.ARCHITECTURES[self.architecture]
        self.tokenizer = self.processor.tokenizer
        freeze_tokenizer_settings(self.tokenizer)

        config = self.model.config
        self.image_token_id: int = config.image_token_id
        self.merge_size: int = config.vision_config.spatial_merge_size
        self.stop_ids = stop_ids(self.tokenizer, self.model.generation_config, self.STOP_TOKENS)
        self.repetition_penalty, self.no_repeat_ngram_size = generation_defaults(
            self.model.generation_config
        )
        if not self.stop_ids:
            raise ValueError(
                f"{spec}: the tokenizer has none of the stop tokens {self.STOP_TOKENS}"
            )
        self.decoder = TextDecoder.of(
            self.model.model.language_model, self.model.lm_head, config.text_config, spec
        )
        self.num_layers = self.decoder.num_layers
        self.num_kv_heads = self.decoder.num_kv_heads
        self.head_dim = self.decoder.head_dim
        self.image_tokens = image_token_range(self.processor.image_processor)

    def describe(self, default_mode: str) -> str:
        """One line for the log: the model, its device and dtype, its image tokens."""
        dtype = str(self.dtype).removeprefix("torch.")
        low, high = self.image_tokens
        return (
            f"{self.display_name} {self.name} on {self.kind} ({dtype}): {low}..{high} image "
            f"tokens per image, default mode {default_mode!r}"
        )

    def _check(self, crop: bool, *texts: str) -> None:
        """ValueError for what no request to this family may ask."""
        if crop:
            raise ValueError(
                f"crop: {self.display_name} reads an image whole, at its own resolution; "
                "it has no tiles"
            )
        for text in texts:
            if any(marker in text for marker in self.MARKERS):
                raise ValueError(f"the text may not contain the image markers {self.MARKERS}")

    def _prompt(self, messages: list[dict[str, Any]], image: np.ndarray) -> MRopePrompt:
        """The chat (its user turn holding one image) as prompt ids, patches and M-RoPE
        positions, through the checkpoint's own chat template and processor.

        Thread-safe (runs on the worker pool): the processor keeps no per-call state, the
        tokenizer's padding and truncation were cleared at load, and ``get_rope_index`` only
        reads the config."""
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
        return MRopePrompt(
            prompt_ids=ids[0].tolist(),
            pixel_values=inputs["pixel_values"].to(self.dtype),
            image_grid_thw=grid,
            rope_positions=positions[:, 0],
            rope_delta=int(delta[0, 0]),
        )

    def encode_images(self, prepared: list[MRopePrompt]) -> list[torch.Tensor]:
        """The vision tower (and merger or projector) over the images of several requests in
        one call (``vision_batch`` at most): ``(image tokens, hidden)`` per request.

        The towers pack images as one sequence with per-image attention bounds (``cu_seqlens``
        from the grids), so an image's features do not depend on the others in the call: they
        equal ``generate``'s, which encodes one request's images alone."""
        features: list[torch.Tensor] = []
        size = self.vision_batch or len(prepared)
        for i in range(0, len(prepared), size):
            batch = prepared[i : i + size]
            out = self.model.model.get_image_features(
                torch.cat([p.pixel_values for p in batch]).to(self.device, self.dtype),
                torch.cat([p.image_grid_thw for p in batch]).to(self.device),
                return_dict=True,
            )
            images = iter(out.pooler_output)  # one tensor per image, in the grids' order
            for p in batch:
                features.append(torch.cat([next(images) for _ in range(len(p.image_grid_thw))]))
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


class MRopeVlmRunner(CheckpointRunner):
    """The slot runner over an M-RoPE family: what ``--ocr-model DIR`` loads for its
    checkpoints. A family's runner names its model class in :attr:`FAMILY`."""

    FAMILY: ClassVar[type[MRopeVlm]]
    family: MRopeVlm

    @property
    def processor(self) -> Any:
        return self.family.processor


def stop_ids(
    tokenizer: Any, generation_config: Any, stop_tokens: tuple[str, ...]
) -> frozenset[int]:
    """The generation config's end-of-sequence ids, and the ``stop_tokens`` the vocabulary has
    (checkpoints' generation configs do not all list their chat's end-of-turn token)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in stop_tokens if token in vocab)
    return frozenset(ids)


def image_token_range(image_processor: Any) -> tuple[int, int]:
    """Fewest and most image tokens of one image, from the processor's pixel bounds."""
    size = getattr(image_processor, "size", None) or {}
    side = image_processor.patch_size * image_processor.merge_size
    low = size.get("shortest_edge") or getattr(image_processor, "min_pixels", 0) or 0
    high = size.get("longest_edge") or getattr(image_processor, "max_pixels", 0) or 0
    return low // side**2, high // side**2


def load(
    spec: str, dtype: torch.dtype, device: torch.device, architectures: Mapping[str, str]
) -> tuple[Any, Any]:
    """Load model and processor with the calls a real checkpoint uses: the class its config
    names, and its own processor. ValueError for an architecture not in ``architectures``."""
    import transformers

    from ragws.models import checkpoint_architecture

    architecture = checkpoint_architecture(spec)
    if architecture not in architectures:
        raise ValueError(
            f"{spec}: {architecture!r} is not one of {', '.join(architectures)} "
            f"({', '.join(architectures.values())})"
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
