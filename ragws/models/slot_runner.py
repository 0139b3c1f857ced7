"""The slot runner: engine steps over a preallocated KV cache, for any decoder-only VLM family.

The engine (:mod:`ragws.engine.engine`) decides who runs; this module owns the tensors. One
:meth:`SlotRunner.step` encodes the images of every newly admitted sequence, prefills them, and
decodes one token for every running sequence: the argmax, or for a request that samples a draw
from its own generator.

A model family plugs in as a :class:`SlotModel` (:mod:`ragws.models.got_ocr2` is one): it
prepares a request (prompt ids and pixel inputs), encodes images, embeds token ids with the
image features merged at their placeholders, and runs its decoder over given positions, calling
the runner's :class:`SlotAttention` in each layer, which reads and writes the KV slots. The
runner batches the prefills and decodes, owns the cache and samples; the family never sees a
slot's bookkeeping, and the runner never sees a model's layers.

Why the decoder is replayed instead of calling ``model.generate`` or the model's ``forward``:
transformers' cache objects grow per request and per batch, so sequences could not join or leave
a running batch between tokens. Here the KV cache is a set of preallocated tensors
``[num_slots, kv_heads, max_model_len, head_dim]`` per layer, and a sequence owns one slot
(``Sequence.slot``, handed out by :class:`~ragws.engine.kv_slots.SlotAllocator`) from admission
to its end. A family replays its decoder over the checkpoint's own modules (projections, norms,
MLP, rotary embedding) with :func:`torch.nn.functional.scaled_dot_product_attention` reading the
slot tensors, so outputs are token-identical to ``model.generate(do_sample=False)`` run on one
request alone.

Positions and masks (the off-by-ones):

* Prefill writes the prompt's keys/values at positions ``0 .. L-1`` of the slot, overwriting
  whatever an earlier owner left, and attends causally within the prompt only.
* A decode step feeds ``seq.output_ids[-1]`` at position ``p = seq.num_tokens - 1`` (prompt +
  outputs so far - 1: the first generated token sits right after the prompt at ``L``), writes
  its key/value at ``p`` and attends to positions ``0 .. p`` of its own slot. The last
  generated token's key/value is therefore never written. The scheduler ends a sequence before
  its tokens outnumber ``max_model_len`` (:meth:`~ragws.engine.scheduler.Scheduler.fits`), so
  ``p`` stays inside the slot.
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
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from ragws.engine.kv_slots import slots_in_budget
from ragws.engine.runner import Prepared
from ragws.engine.sequence import Sequence

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class SlotAttention(Protocol):
    """Attention over the KV slots, one call per decoder layer.

    ``q``, ``k``, ``v`` are the layer's projections after the rotary embedding, ``(B, heads, L,
    head_dim)`` (``kv_heads`` for ``k`` and ``v``); the result is ``(B, heads, L, head_dim)``.
    """

    slots: list[int]  # the slot of each live sequence in the forward (prefill: each row)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> torch.Tensor: ...


class SlotModel(Protocol):
    """A model family, as the slot runner drives it: the seam where a family plugs in.

    The runner calls, per step: :meth:`encode_images` for the admitted sequences' prepared
    requests, then per group of equal-length prompts :meth:`embed` (with their features) and
    :meth:`forward` from position 0; then for the decoding sequences :meth:`embed` (no images)
    and :meth:`forward` at their positions; and :meth:`logits` on the last positions. A family
    whose rotary positions are not the cache positions (M-RoPE) derives its own from the
    ``positions`` given and what it kept of each slot's prompt (``attention.slots``).
    """

    name: str
    summary: str  # one line for the log: the model, its device and dtype, its image tokens
    tokenizer: Any
    stop_ids: frozenset[int]
    device: torch.device
    dtype: torch.dtype  # of the KV cache
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def prepare(
        self,
        image: np.ndarray,
        *,
        mode: str = "format",
        crop: bool = False,
        prompt: str | None = None,
        system: str | None = None,
    ) -> Prepared:
        """Prompt ids and pixel inputs for one page (worker pool, no GPU; thread-safe)."""
        ...

    def encode_images(self, prepared: list[Any]) -> list[torch.Tensor]:
        """Image features of each prepared request, ``(image tokens, hidden)`` each."""
        ...

    def embed(self, ids: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``(B, L)`` token ids as ``(B, L, hidden)`` embeddings, each row's image features (in
        row order) merged at its image placeholders."""
        ...

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention: SlotAttention
    ) -> torch.Tensor:
        """The decoder over ``embeds`` at ``positions`` ``(B, L)``: hidden states ``(B, L,
        hidden)`` before the final norm, attending through ``attention`` in each layer."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and language-model head: ``(B, hidden)`` → ``(B, vocab)``."""
        ...


@dataclass(slots=True)
class PrefillAttention:
    """Prompts of one length from position 0: their keys/values fill positions ``0 .. L-1`` of
    their slots, and they attend causally within themselves."""

    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    slots: list[int]
    index: torch.Tensor  # the slots, on the device

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> torch.Tensor:
        length = k.shape[2]
        self.k_cache[layer][self.index, :, :length] = k
        self.v_cache[layer][self.index, :, :length] = v
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )


@dataclass(slots=True)
class DecodeAttention:
    """One token per row over the cache view ``[:rows, :, :span]``; only live rows (``index``,
    at ``where``) are written, every row attends to ``t <= its position``."""

    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    slots: list[int]
    index: torch.Tensor  # the live rows (= their slots)
    where: torch.Tensor  # the position each live row writes
    visible: torch.Tensor  # (rows, 1, 1, span): the mask
    span: int

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> torch.Tensor:
        # Only live rows are written: an idle row may be a slot prefilled moments ago.
        self.k_cache[layer][self.index, :, self.where] = k[self.index, :, 0]
        self.v_cache[layer][self.index, :, self.where] = v[self.index, :, 0]
        rows, kv_heads, head_dim = q.shape[0], k.shape[1], q.shape[-1]
        # GQA without repeating K/V: the query heads sharing a KV head become that head's
        # queries (one token per row, so the query axis is free). Any SDPA kernel applies.
        out = F.scaled_dot_product_attention(
            q.reshape(rows, kv_heads, -1, head_dim),
            self.k_cache[layer][:rows, :, : self.span],
            self.v_cache[layer][:rows, :, : self.span],
            attn_mask=self.visible,
            scale=scale,
        )
        return out.reshape(q.shape)


class SlotRunner:
    """Runs engine steps of a :class:`SlotModel` over a slot-based KV cache; see the module
    docstring. Implements :class:`ragws.engine.runner.StepRunner`."""

    def __init__(
        self,
        family: SlotModel,
        *,
        num_slots: int = 16,
        max_model_len: int = 4096,
        kv_budget_bytes: int | None = None,
    ) -> None:
        """``num_slots`` caps the sequences decoding at once; with ``kv_budget_bytes`` the slot
        count is further limited to what fits the budget at ``max_model_len`` tokens each."""
        if max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        self.family = family
        self.name = family.name
        self.tokenizer = family.tokenizer
        self.stop_ids = family.stop_ids
        self.num_layers = family.num_layers
        self.num_kv_heads = family.num_kv_heads
        self.head_dim = family.head_dim
        self.max_model_len = max_model_len
        self.num_slots = slots_in_budget(
            num_slots,
            max_model_len=max_model_len,
            token_bytes=self.kv_bytes_per_token(),
            budget_bytes=kv_budget_bytes,
        )
        shape = (self.num_slots, self.num_kv_heads, max_model_len, self.head_dim)
        with torch.inference_mode():
            self._k = [self._zeros(shape) for _ in range(self.num_layers)]
            self._v = [self._zeros(shape) for _ in range(self.num_layers)]
        # Tokens whose keys/values each slot holds; checked against the sequence on decode.
        self._lengths = [0] * self.num_slots
        log.info(
            "%s; KV cache %d slots × %d tokens = %.1f MiB",
            family.summary,
            self.num_slots,
            max_model_len,
            self.kv_cache_bytes() / 2**20,
        )

    # --- public API ------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of context takes in one slot (all layers, K and V)."""
        elem = torch.empty((), dtype=self.family.dtype).element_size()
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
    ) -> Prepared:
        """The family's :meth:`SlotModel.prepare` (worker pool, no GPU; thread-safe)."""
        return self.family.prepare(image, mode=mode, crop=crop, prompt=prompt, system=system)

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

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.family.dtype, device=self.family.device)

    def _prefill(self, seqs: list[Sequence]) -> list[int]:
        for seq in seqs:  # before the (costly) vision tower runs
            if seq.slot is None:
                raise ValueError(f"sequence {seq.seq_id} is prefilled without a KV slot")
            if seq.image is None:
                raise ValueError(f"sequence {seq.seq_id} has no prepared request to prefill")
        features = self.family.encode_images([seq.image for seq in seqs])
        # Equal-length prompts (same mode and tile count: the common case) share one forward.
        groups: dict[int, list[int]] = defaultdict(list)
        for i, seq in enumerate(seqs):
            groups[seq.num_prompt_tokens].append(i)
        tokens = [0] * len(seqs)
        device = self.family.device
        for length, members in groups.items():
            group = [seqs[i] for i in members]
            ids = torch.tensor([s.prompt_ids for s in group], device=device)
            embeds = self.family.embed(ids, [features[i] for i in members])
            slots: list[int] = [s.slot for s in group]  # type: ignore[misc]  # checked above
            attention = PrefillAttention(
                self._k, self._v, slots, torch.tensor(slots, device=device)
            )
            positions = torch.arange(length, device=device).expand(len(group), length)
            hidden = self.family.forward(embeds, positions, attention)
            next_tokens = self._next_tokens(hidden[:, -1], group)
            for token, i in zip(next_tokens, members, strict=True):
                tokens[i] = token
            for slot in slots:
                self._lengths[slot] = length
        # The pixels are dead weight from here on (up to 13 tiles of 3 × 1024² per sequence).
        for seq in seqs:
            seq.image = None
        return tokens

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
                    f"slot {slot} holds {self._lengths[slot]} tokens, but sequence "
                    f"{seq.seq_id} decodes at position {pos}"
                )
            slots.append(slot)
            positions.append(pos)
        rows = 1 + max(slots)
        span = 1 + max(positions)
        device = self.family.device
        index = torch.tensor(slots, device=device)
        where = torch.tensor(positions, device=device)
        # Idle rows (free slots, or slots prefilled this step) get token 0 at position 0.
        ids = torch.zeros(rows, dtype=torch.long, device=device)
        ids[index] = torch.tensor([seq.output_ids[-1] for seq in seqs], device=device)
        pos = torch.zeros(rows, dtype=torch.long, device=device)
        pos[index] = where
        visible = torch.arange(span, device=device)[None, :] <= pos[:, None]  # (rows, span)
        attention = DecodeAttention(
            self._k,
            self._v,
            slots,
            index,
            where,
            visible[:, None, None, :],  # broadcast over KV heads and queries
            span,
        )
        hidden = self.family.forward(self.family.embed(ids[:, None]), pos[:, None], attention)
        for slot, p in zip(slots, positions, strict=True):
            self._lengths[slot] = p + 1
        return self._next_tokens(hidden[index, 0], seqs)

    def _next_tokens(self, last: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Each row's next token from the final hidden state of its last position: the argmax,
        or a draw for a sequence that samples."""
        logits = self.family.logits(last)
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if seq.sampling is not None:
                tokens[i] = sample(logits[i], seq)
        return tokens


def sample(logits: torch.Tensor, seq: Sequence) -> int:
    """One draw from ``logits`` under the sequence's temperature, top-k and top-p, with its own
    generator (seeded once), so a seeded request draws the same tokens whatever runs beside
    it."""
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
