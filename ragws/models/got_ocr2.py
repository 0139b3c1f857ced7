"""GOT-OCR2 adapter for the continuous-batching OCR engine.

The engine (``ragws.engine.engine``) decides who runs; this module owns the tensors. One
:meth:`GotOcr2Runner.step` runs the vision tower for every newly admitted sequence, prefills
them, and decodes one token for every running sequence: the argmax, or for a request that
samples a draw from its own generator.

Why the decoder is written out here instead of calling ``model.generate`` or the model's
``forward``: transformers' cache objects grow per request and per batch, so sequences could not
join or leave a running batch between tokens. Here the KV cache is a set of preallocated
tensors ``[num_slots, kv_heads, max_model_len, head_dim]`` per layer, and a sequence owns one
slot (``Sequence.slot``, handed out by :class:`~ragws.engine.kv_slots.SlotAllocator`) from admission
to its end. The Qwen2 decoder is replayed over the loaded modules (projections, norms, MLP,
rotary embedding: the checkpoint's own code and weights) with
:func:`torch.nn.functional.scaled_dot_product_attention` reading the slot tensors, so
outputs are token-identical to ``model.generate(do_sample=False)`` run on one request alone.

Positions and masks (the off-by-ones):

* Prefill writes the prompt's keys/values at positions ``0 .. L-1`` of the slot, overwriting
  whatever an earlier owner left, and attends causally within the prompt only.
* A decode step feeds ``seq.output_ids[-1]`` at position ``p = seq.num_tokens - 1`` (prompt +
  outputs so far - 1: the first generated token sits right after the prompt at ``L``), writes
  its key/value at ``p`` and attends to positions ``0 .. p`` of its own slot. The last
  generated token's key/value is therefore never written, so a sequence needs
  ``L + max_tokens - 1 <= max_model_len`` positions.
* The batched decode reads the cache as a view ``[:S, :, :T]`` (``S`` = 1 + highest active
  slot, ``T`` = 1 + highest position): no gather, no copy. Each row's mask is
  ``t <= p`` computed from the sequence itself, never from what the slot held before, so a
  stale longer length cannot leak in. Rows of slots without a decoding sequence (free, or
  prefilled in this very step) get a dummy token at position 0, attend to position 0 only, and
  are never written to the cache, so they cannot corrupt a live slot; their outputs are
  dropped. The cache is zero-initialised so that masked, never-written entries are finite
  (a NaN key would poison the masked softmax).

Memory: ``kv_cache_bytes() = 2 × layers × num_slots × kv_heads × max_model_len × head_dim ×
dtype size``, allocated once at load and logged. For the real GOT-OCR2 (24 layers, 16 KV heads
of 64) in bf16 that is 96 KiB per token of context: 384 MiB per 4096-token slot, 6 GiB for the
default 16 slots.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ragws.engine.sequence import Sequence

__all__ = [
    "HF_REPO",
    "HUB_SPEC",
    "MODES",
    "STOP_TOKENS",
    "TASK_PROMPTS",
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


class ModelUnavailableError(RuntimeError):
    """The checkpoint could not be loaded (typically: the hub is out of reach)."""


@dataclass(slots=True)
class OcrPrompt:
    """A prepared request: the prompt and its image tiles. Stored as ``Sequence.image`` until
    the prefill, which sets ``Sequence.image`` to None to free the pixels."""

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


class GotOcr2Runner:
    """Runs GOT-OCR2 steps over a slot-based KV cache; see the module docstring."""

    def __init__(
        self,
        spec: str,
        device: str = "cpu",
        *,
        num_slots: int = 16,
        max_model_len: int = 4096,
        kv_budget_bytes: int | None = None,
        vision_batch: int | None = None,
    ) -> None:
        """Load ``spec`` (``"got-ocr2"`` or a ``save_pretrained`` directory) onto ``device``.

        ``num_slots`` caps the sequences decoding at once; with ``kv_budget_bytes`` the slot
        count is further limited to what fits the budget at ``max_model_len`` tokens each.
        ``vision_batch`` caps the tiles per vision-tower call (None: all of a step's tiles on
        CUDA, 2 on CPU, where the global-attention layers make large batches slower per tile).
        """
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        self._torch_device = torch.device(device)
        # bf16 is what the checkpoint ships in; CPUs run it slowly (and fp32 is the reference).
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.name = HUB_SPEC if spec == HUB_SPEC else Path(spec).resolve().name
        self.vision_batch = vision_batch or (None if self.device == "cuda" else 2)
        self.model, self.processor = _load(spec, self.dtype, self._torch_device)
        self.tokenizer = self.processor.tokenizer
        self._freeze_tokenizer_settings()

        vocab = self.tokenizer.get_vocab()
        self.stop_ids = frozenset(vocab[t] for t in STOP_TOKENS if t in vocab)
        if not self.stop_ids:
            raise ValueError(f"{spec}: the tokenizer has none of the stop tokens {STOP_TOKENS}")

        config = self.model.config
        self.image_token_id: int = config.image_token_id
        self.image_tokens = derive_image_tokens(self.model)
        # The processor inserts a fixed count (a class attribute, 256) unless told otherwise.
        self._processor_kwargs: dict[str, Any] = {}
        if self.processor.num_image_tokens != self.image_tokens:
            self._processor_kwargs["num_image_tokens"] = self.image_tokens

        text = config.text_config
        if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
            raise NotImplementedError(f"{spec}: sliding-window attention layers are not supported")
        self._lm = self.model.model.language_model
        attn = self._lm.layers[0].self_attn
        self.num_layers: int = text.num_hidden_layers
        self.num_heads: int = text.num_attention_heads
        self.num_kv_heads: int = text.num_key_value_heads
        self.head_dim: int = attn.head_dim
        self._scale: float = attn.scaling
        self._gqa = self.num_heads != self.num_kv_heads

        self.max_model_len = max_model_len
        per_slot = self.kv_bytes_per_token() * max_model_len
        if kv_budget_bytes is not None:
            fit = kv_budget_bytes // per_slot
            if fit < 1:
                raise ValueError(
                    f"kv_budget_bytes={kv_budget_bytes} holds no slot of {max_model_len} tokens "
                    f"({per_slot} bytes each)"
                )
            num_slots = min(num_slots, fit)
        if num_slots < 1:
            raise ValueError("num_slots must be at least 1")
        self.num_slots = num_slots
        shape = (num_slots, self.num_kv_heads, max_model_len, self.head_dim)
        with torch.inference_mode():
            self._k = [self._zeros(shape) for _ in range(self.num_layers)]
            self._v = [self._zeros(shape) for _ in range(self.num_layers)]
        # Tokens whose keys/values each slot holds; checked against the sequence on decode.
        self._lengths = [0] * num_slots
        log.info(
            "GOT-OCR2 %s on %s (%s): %d image tokens per tile; KV cache %d slots × %d tokens "
            "= %.1f MiB",
            self.name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.image_tokens,
            num_slots,
            max_model_len,
            self.kv_cache_bytes() / 2**20,
        )

    # --- public API ------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of context takes in one slot (all layers, K and V)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def kv_cache_bytes(self) -> int:
        """Bytes held by the preallocated KV cache (allocated once, at load)."""
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))

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

    @torch.inference_mode()
    def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int]:
        """Run one engine step: the first token of each ``prefill`` sequence (vision, prompt)
        and the next token of each ``decode`` sequence, in that order.

        Prefill runs first, so a prefill that fails (out of memory, say) has not touched the
        running sequences' cache: the engine can fail the newcomers and decode again alone.
        """
        try:
            tokens = self._prefill(prefill) if prefill else []
            if decode:
                tokens += self._decode(decode)
        except torch.cuda.OutOfMemoryError:
            # Hand the failed step's cached activation blocks back, so the engine's retry and
            # the next steps find the memory free.
            torch.cuda.empty_cache()
            raise
        return tokens

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

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self._torch_device)

    def _freeze_tokenizer_settings(self) -> None:
        """Clear padding/truncation on the Rust tokenizer once, so that encodes never mutate it
        (a mutation racing another thread's encode raises "Already borrowed")."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None:
            return
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()

    def _encode_images(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Vision tower + projector for all admitted sequences' tiles, split back per sequence."""
        prompts: list[OcrPrompt] = [seq.image for seq in seqs]
        pixels = torch.cat([p.pixel_values for p in prompts]).to(self._torch_device, self.dtype)
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
        return [f.flatten(0, 1) for f in features.split([p.tiles for p in prompts])]

    def _prefill(self, seqs: list[Sequence]) -> list[int]:
        for seq in seqs:  # before the (costly) vision tower runs
            if seq.slot is None:
                raise ValueError(f"request {seq.request_id} is prefilled without a KV slot")
            if not isinstance(seq.image, OcrPrompt):
                raise ValueError(f"request {seq.request_id} has no prepared image to prefill")
            if seq.num_prompt_tokens > self.max_model_len:
                raise ValueError(
                    f"request {seq.request_id}: a {seq.num_prompt_tokens}-token prompt exceeds "
                    f"max_model_len {self.max_model_len}"
                )
        features = self._encode_images(seqs)
        # Equal-length prompts (same mode and tile count: the common case) share one forward.
        groups: dict[int, list[int]] = defaultdict(list)
        for i, seq in enumerate(seqs):
            groups[seq.num_prompt_tokens].append(i)
        tokens = [0] * len(seqs)
        for length, members in groups.items():
            group = [seqs[i] for i in members]
            ids = torch.tensor([s.prompt_ids for s in group], device=self._torch_device)
            embeds = self._lm.embed_tokens(ids)
            mask = (ids == self.image_token_id).unsqueeze(-1)
            image = torch.cat([features[i] for i in members]).to(embeds.dtype)
            if int(mask.sum()) * embeds.shape[-1] != image.numel():
                raise ValueError("image placeholders and image features differ in number")
            embeds = embeds.masked_scatter(mask, image)
            slots: list[int] = [s.slot for s in group]  # type: ignore[misc]  # checked above
            next_tokens = self._prefill_group(embeds, slots, group)
            for token, i in zip(next_tokens, members, strict=True):
                tokens[i] = token
            for slot in slots:
                self._lengths[slot] = length
        # The pixels are dead weight from here on (up to 13 tiles of 3 × 1024² per sequence).
        for seq in seqs:
            seq.image = None
        return tokens

    def _prefill_group(
        self, embeds: torch.Tensor, slots: list[int], seqs: list[Sequence]
    ) -> list[int]:
        """Forward ``B`` prompts of one length from position 0; fill their slots' K/V."""
        batch, length, _ = embeds.shape
        index = torch.tensor(slots, device=self._torch_device)
        positions = torch.arange(length, device=self._torch_device).expand(batch, length)
        cos, sin = self._lm.rotary_emb(embeds, positions)
        h = embeds
        for i, layer in enumerate(self._lm.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            self._k[i][index, :, :length] = k
            self._v[i][index, :, :length] = v
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self._scale, enable_gqa=self._gqa
            )
            h = self._finish_layer(layer, h, out)
        return self._next_tokens(h[:, -1], seqs)

    def _decode(self, seqs: list[Sequence]) -> list[int]:
        """One token for every running sequence, in one forward over the cache view."""
        slots: list[int] = []
        positions: list[int] = []
        for seq in seqs:
            slot, pos = seq.slot, seq.num_tokens - 1
            if slot is None:
                raise ValueError("a decoding sequence has no KV slot")
            if self._lengths[slot] != pos:
                raise RuntimeError(
                    f"slot {slot} holds {self._lengths[slot]} tokens, but request "
                    f"{seq.request_id} decodes at position {pos}"
                )
            if pos >= self.max_model_len:
                raise ValueError(f"request {seq.request_id} outgrew max_model_len")
            slots.append(slot)
            positions.append(pos)
        rows = 1 + max(slots)
        span = 1 + max(positions)
        dev = self._torch_device
        index = torch.tensor(slots, device=dev)
        where = torch.tensor(positions, device=dev)
        # Idle rows (free slots, or slots prefilled this step) get token 0 at position 0.
        ids = torch.zeros(rows, dtype=torch.long, device=dev)
        ids[index] = torch.tensor([seq.output_ids[-1] for seq in seqs], device=dev)
        pos = torch.zeros(rows, dtype=torch.long, device=dev)
        pos[index] = where
        visible = torch.arange(span, device=dev)[None, :] <= pos[:, None]  # (rows, span)
        visible = visible[:, None, None, :]  # broadcast over KV heads and queries
        h = self._lm.embed_tokens(ids[:, None])
        cos, sin = self._lm.rotary_emb(h, pos[:, None])
        for i, layer in enumerate(self._lm.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            # Only live rows are written: an idle row may be a slot prefilled moments ago.
            self._k[i][index, :, where] = k[index, :, 0]
            self._v[i][index, :, where] = v[index, :, 0]
            # GQA without repeating K/V: the query heads sharing a KV head become that head's
            # queries (one token per row, so the query axis is free). Any SDPA kernel applies.
            out = F.scaled_dot_product_attention(
                q.reshape(rows, self.num_kv_heads, -1, self.head_dim),
                self._k[i][:rows, :, :span],
                self._v[i][:rows, :, :span],
                attn_mask=visible,
                scale=self._scale,
            )
            h = self._finish_layer(layer, h, out.reshape(q.shape))
        for slot, p in zip(slots, positions, strict=True):
            self._lengths[slot] = p + 1
        return self._next_tokens(h[index, 0], seqs)

    def _qkv(
        self, layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm, projections and rotary embedding: ``(B, heads, L, head_dim)`` each."""
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        batch, length, _ = x.shape
        q = attn.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _finish_layer(self, layer: Any, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, then the post-norm MLP and residual."""
        batch, _, length, _ = attn_out.shape
        h = h + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(batch, length, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _next_tokens(self, last: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Each row's next token from the final hidden state of its last position: the argmax,
        or a draw for a sequence that samples."""
        logits = self.model.lm_head(self._lm.norm(last))
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if seq.sampling is not None:
                tokens[i] = self._sample(logits[i], seq)
        return tokens

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        """One draw from ``logits`` under the sequence's temperature, top-k and top-p, with its
        own generator (seeded once), so a seeded request draws the same tokens whatever runs
        beside it."""
        params = seq.sampling
        assert params is not None
        if seq.rng is None:
            seq.rng = torch.Generator(device=logits.device)
            if params.seed is None:
                seq.rng.seed()
            else:
                seq.rng.manual_seed(params.seed)
        logits = logits.float() / params.temperature
        if 0 < params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            ranked, order = probs.sort(descending=True)
            # Keep the likeliest tokens until their mass reaches top_p (the first always).
            ranked[(ranked.cumsum(0) - ranked) >= params.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, ranked)
        if not bool(torch.isfinite(probs).all()):  # never let one request's draw fail a step
            return int(logits.argmax())
        return int(torch.multinomial(probs, 1, generator=seq.rng))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
