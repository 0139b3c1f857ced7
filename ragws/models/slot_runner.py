"""The slot runner: engine steps over a preallocated KV cache, for any decoder-only VLM family.

The engine (:mod:`ragws.engine.engine`) decides who runs; this module owns the tensors. One
:meth:`SlotRunner.step` prefills the step's prompt chunks (whole prompts, or for a prompt longer
than the scheduler's per-step budget one chunk of it per step), encoding a sequence's images
when its first chunk that reaches them runs, and decodes one token for every running sequence:
the argmax, or for a request that samples a draw from its own generator.

A model family plugs in as a :class:`SlotModel` (:mod:`ragws.models.got_ocr2` and
:mod:`ragws.models.qwen2_vl` are two): it prepares a request (prompt ids and pixel inputs),
encodes images, embeds token ids with the image features merged at their placeholders, and runs
its decoder over given positions, calling the runner's :class:`SlotAttention` in each layer,
which reads and writes the KV slots. The runner batches the prefills and decodes, owns the
cache and samples; the family never sees a slot's bookkeeping, and the runner never sees a
model's layers.

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
  whatever an earlier owner left, and attends causally within the prompt only. A prompt
  prefilled in chunks does the same a chunk ``[a, b)`` at a time (``seq.prefill_span``, which
  the scheduler sets): the chunk writes positions
  ``a .. b-1`` and its token ``a + i`` attends to positions ``0 .. a + i`` of its slot (the
  earlier chunks' keys/values, and its own causally). Only the chunk that ends the prompt
  (``b = L``) is sampled.
* Image features: a sequence's images are encoded once, by the first chunk that holds one of
  its image placeholders, and kept on the sequence (``seq.features``) until a chunk has passed
  the last placeholder; each chunk merges the feature rows of the placeholders in ``[a, b)``
  (features are in placeholder order, so rows ``count(placeholders before a)`` onwards).
* A decode step feeds ``seq.output_ids[-1]`` at position ``p = seq.num_tokens - 1`` (prompt +
  outputs so far - 1: the first generated token sits right after the prompt at ``L``), writes
  its key/value at ``p`` and attends to positions ``0 .. p`` of its own slot. The last
  generated token's key/value is therefore never written. The scheduler ends a sequence before
  its tokens outnumber ``max_model_len`` (:meth:`~ragws.engine.scheduler.Scheduler.fits`), so
  ``p`` stays inside the slot.
* Rotary positions are the cache positions, unless the prepared request carries its own
  (M-RoPE: an image's tokens share positions along its rows and columns): then the prefill
  runs at the request's ``rope_positions`` ``(axes, L)`` (a chunk at their slice
  ``[:, a:b]``), and every later token at its cache position plus the request's
  ``rope_delta`` (kept per slot, as the prepared request is dropped after the last chunk).
* The batched decode reads the cache as a view ``[:S, :, :T]`` (``S`` = 1 + highest active
  slot, ``T`` = 1 + highest position): no gather, no copy. Each row's mask is
  ``t <= p`` computed from the sequence itself, never from what the slot held before, so a
  stale longer length cannot leak in. Rows of slots without a decoding sequence (free, or
  prefilled in this very step) get a dummy token at position 0, attend to position 0 only, and
  are never written to the cache, so they cannot corrupt a live slot; their outputs are
  dropped (a slot whose prompt is partly prefilled is such a row too). The cache is
  zero-initialised so that masked, never-written entries are finite (a NaN key would poison
  the masked softmax).

Memory: ``kv_cache_bytes() = 2 × layers × num_slots × kv_heads × max_model_len × head_dim ×
dtype size``, allocated once at load and logged; layers, KV heads and head size are the
family's own (its text config's), so a KV budget (``kv_budget_bytes``) holds as many slots as
that model's bytes per token allow. For the real GOT-OCR2 (24 layers, 16 KV heads of 64) in
bf16 that is 96 KiB per token of context: 384 MiB per 4096-token slot, 6 GiB for the default
16 slots. A chunk after a prompt's first reads its slot's keys/values ``[0, b)`` as a copy per
layer, and the prefill's activations scale with the chunk, not the prompt.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from ragws.engine.kv_slots import slots_in_budget
from ragws.engine.runner import Prepared, Tasks
from ragws.engine.sequence import Sequence

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class ModelUnavailableError(RuntimeError):
    """The checkpoint could not be loaded (typically: the hub is out of reach)."""


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

    The runner calls, per step: :meth:`encode_images` for the prepared requests whose image
    placeholders the step's prompt chunks reach first, then per group of chunks of equal span
    (whole prompts of one length, the common case) :meth:`embed` of the chunks' ids (with the
    features of the placeholders among them) and :meth:`forward` at the chunks' positions; then
    for the decoding sequences :meth:`embed` (no images) and :meth:`forward` at their
    positions; and :meth:`logits` on the last positions of the rows it samples.

    ``image_token_id`` is the placeholder the features replace, one feature row per
    placeholder in the order :meth:`encode_images` gives them: the runner counts placeholders
    to hand each chunk the rows that fall in it, so a family's :meth:`embed` need not know
    where in its prompt a chunk starts.

    A family whose rotary positions are not the cache positions (M-RoPE) gives them with each
    prepared request, as ``rope_positions`` (a ``(axes, L)`` tensor for the prompt) and
    ``rope_delta`` (an int: a later token's rotary position is its cache position plus it).
    The prefill's :meth:`forward` then gets ``(axes, B, L)`` positions (for a chunk ``[a, b)``
    the slice ``[:, a:b]`` of each request's), the decode's the cache positions shifted by each
    slot's delta.
    """

    name: str
    tasks: Tasks  # its modes, and the mode each kind of layout region is read with
    repetition_penalty: float  # what its generation config has ``generate`` apply (1: none)
    no_repeat_ngram_size: int  # likewise (0: none)
    summary: str  # one line for the log: the model, its device and dtype, its image tokens
    tokenizer: Any
    stop_ids: frozenset[int]
    device: torch.device
    dtype: torch.dtype  # of the KV cache
    num_layers: int
    num_kv_heads: int
    head_dim: int
    image_token_id: int  # the image placeholder of the prompts

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
        """``(B, L)`` token ids (whole prompts, prompt chunks, or decode tokens) as ``(B, L,
        hidden)`` embeddings, each row's image features (in row order: exactly one row per
        ``image_token_id`` in the row's ids, possibly none) merged at its image placeholders."""
        ...

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention: SlotAttention
    ) -> torch.Tensor:
        """The decoder over ``embeds`` at rotary ``positions`` ``(B, L)`` (``(axes, B, L)`` for a
        prefill of requests with ``rope_positions``): hidden states ``(B, L, hidden)`` before the
        final norm, attending through ``attention`` in each layer."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and language-model head: ``(B, hidden)`` → ``(B, vocab)``."""
        ...


@dataclass(slots=True)
class PrefillAttention:
    """Prompt chunks of one span ``[start, start + L)`` (whole prompts: ``start`` 0): their
    keys/values fill those positions of their slots, and token ``start + i`` attends to
    positions ``0 .. start + i`` of its own slot."""

    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    slots: list[int]
    index: torch.Tensor  # the slots, on the device
    start: int = 0
    # (L, start + L): the mask of a chunk after the first (None: causal within the chunk).
    visible: torch.Tensor | None = None

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> torch.Tensor:
        end = self.start + k.shape[2]
        self.k_cache[layer][self.index, :, self.start : end] = k
        self.v_cache[layer][self.index, :, self.start : end] = v
        gqa = q.shape[1] != k.shape[1]
        if self.visible is None:  # nothing before the chunk: the keys are the chunk's own
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )
        return F.scaled_dot_product_attention(
            q,
            self.k_cache[layer][self.index, :, :end],
            self.v_cache[layer][self.index, :, :end],
            attn_mask=self.visible,
            scale=scale,
            enable_gqa=gqa,
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
        self.tasks = family.tasks
        self.tokenizer = family.tokenizer
        self.stop_ids = family.stop_ids
        self.repetition_penalty = family.repetition_penalty
        self.no_repeat_ngram_size = family.no_repeat_ngram_size
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
        # Rotary position minus cache position of each slot's generated tokens (M-RoPE).
        self._rope_deltas = [0] * self.num_slots
        # (slots, vocab): the tokens each slot's prompt and output hold, for sequences with a
        # repetition penalty; allocated when the first such sequence runs.
        self._seen: torch.Tensor | None = None
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
    def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int | None]:
        """Run one engine step: each ``prefill`` sequence's prompt chunk (vision, prompt; its
        first token when the chunk ends the prompt, else None) and the next token of each
        ``decode`` sequence, in that order.

        Prefill runs first, so a prefill that fails (out of memory, say) has not touched the
        running sequences' cache: the engine can fail the newcomers and decode again alone.
        """
        try:
            tokens: list[int | None] = self._prefill(prefill) if prefill else []
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

    def _prefill(self, seqs: list[Sequence]) -> list[int | None]:
        """Each sequence's chunk ``seq.prefill_span`` of its prompt; the first token of those
        whose chunk ends the prompt, None for the others."""
        spans: list[tuple[int, int]] = []
        for seq in seqs:  # before the (costly) vision tower runs
            if seq.slot is None:
                raise ValueError(f"sequence {seq.seq_id} is prefilled without a KV slot")
            if seq.image is None:
                raise ValueError(f"sequence {seq.seq_id} has no prepared request to prefill")
            start, end = seq.prefill_span
            if not 0 <= start < end <= seq.num_prompt_tokens:
                raise ValueError(f"sequence {seq.seq_id} has no prompt chunk [{start}, {end})")
            if start and self._lengths[seq.slot] != start:
                raise RuntimeError(
                    f"slot {seq.slot} holds {self._lengths[seq.slot]} tokens, but sequence "
                    f"{seq.seq_id} prefills from position {start}"
                )
            spans.append((start, end))
        self._encode_images(seqs, spans)
        # Chunks of one span (whole prompts of one length: the common case) share one forward.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, span in enumerate(spans):
            groups[span].append(i)
        tokens: list[int | None] = [None] * len(seqs)
        device = self.family.device
        for (start, end), members in groups.items():
            group = [seqs[i] for i in members]
            ids = torch.tensor([s.prompt_ids[start:end] for s in group], device=device)
            embeds = self.family.embed(ids, self._chunk_features(group, start, end))
            slots: list[int] = [s.slot for s in group]  # type: ignore[misc]  # checked above
            visible = None
            if start:
                rows = torch.arange(start, end, device=device)[:, None]
                visible = torch.arange(end, device=device)[None, :] <= rows
            attention = PrefillAttention(
                self._k, self._v, slots, torch.tensor(slots, device=device), start, visible
            )
            hidden = self.family.forward(
                embeds, self._prompt_positions(group, start, end), attention
            )
            done = [j for j, seq in enumerate(group) if end == seq.num_prompt_tokens]
            if done:
                next_tokens = self._next_tokens(hidden[done, -1], [group[j] for j in done])
                for token, j in zip(next_tokens, done, strict=True):
                    tokens[members[j]] = token
            for seq, slot in zip(group, slots, strict=True):
                self._lengths[slot] = end
                if end == seq.num_prompt_tokens:
                    self._rope_deltas[slot] = getattr(seq.image, "rope_delta", 0)
                    # The pixels are dead weight now (up to 13 tiles of 3 × 1024² for GOT).
                    seq.image = None
        return tokens

    def _encode_images(self, seqs: list[Sequence], spans: list[tuple[int, int]]) -> None:
        """Encode, in one call, the images of the sequences whose chunk holds their first image
        placeholder yet to be merged (the features are kept on the sequence until a chunk
        has passed the last one)."""
        needed = [
            seq
            for seq, (start, end) in zip(seqs, spans, strict=True)
            if seq.features is None and self.family.image_token_id in seq.prompt_ids[start:end]
        ]
        if needed:
            features = self.family.encode_images([seq.image for seq in needed])
            for seq, f in zip(needed, features, strict=True):
                seq.features = f

    def _chunk_features(
        self, group: list[Sequence], start: int, end: int
    ) -> list[torch.Tensor] | None:
        """Each chunk's feature rows: those of the image placeholders in ``[start, end)``
        (features are in placeholder order). Drops a sequence's features once its chunk has
        passed its last placeholder. None when no chunk holds a placeholder."""
        token = self.family.image_token_id
        rows: list[torch.Tensor | None] = []
        for seq in group:
            ids = seq.prompt_ids
            first = ids[:start].count(token)
            count = ids[start:end].count(token)
            if not count:
                rows.append(None)
                continue
            features: torch.Tensor = seq.features
            rows.append(features[first : first + count])
            if first + count == len(features):  # no placeholder left after this chunk
                seq.features = None
        some = next((r for r in rows if r is not None), None)
        if some is None:
            return None
        return [some[:0] if r is None else r for r in rows]

    def _prompt_positions(self, group: list[Sequence], start: int, end: int) -> torch.Tensor:
        """Rotary positions of a group's chunks ``[start, end)``: ``(B, L)`` cache positions, or
        the slices of the requests' own ``rope_positions`` stacked to ``(axes, B, L)``."""
        device = self.family.device
        own = [getattr(seq.image, "rope_positions", None) for seq in group]
        if all(p is None for p in own):
            return torch.arange(start, end, device=device).expand(len(group), end - start)
        if any(p is None for p in own):
            raise ValueError("prompts with and without their own rotary positions in one group")
        chunks = [p[:, start:end] for p in own]  # type: ignore[index]  # none is None
        return torch.stack(chunks, dim=1).to(device)

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
        rotary = pos
        deltas = [self._rope_deltas[slot] for slot in slots]
        if any(deltas):
            rotary = pos.clone()
            rotary[index] += torch.tensor(deltas, device=device)
        attention = DecodeAttention(
            self._k,
            self._v,
            slots,
            index,
            where,
            visible[:, None, None, :],  # broadcast over KV heads and queries
            span,
        )
        hidden = self.family.forward(self.family.embed(ids[:, None]), rotary[:, None], attention)
        for slot, p in zip(slots, positions, strict=True):
            self._lengths[slot] = p + 1
        return self._next_tokens(hidden[index, 0], seqs)

    def _next_tokens(self, last: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Each row's next token from the final hidden state of its last position: the argmax,
        or a draw for a sequence that samples; after the repetition penalty of the sequences
        that have one, as ``generate`` applies it (before temperature, top-k and top-p)."""
        logits = self.family.logits(last)
        penalized = [i for i, seq in enumerate(seqs) if seq.repetition_penalty != 1.0]
        if penalized:
            logits = self._penalize(logits, seqs, penalized)
        guarded = [i for i, seq in enumerate(seqs) if seq.no_repeat_ngram_size > 0]
        for i in guarded:
            banned = banned_tokens(seqs[i])
            if banned:
                logits = logits.float() if logits.dtype != torch.float32 else logits
                logits[i, banned] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if seq.sampling is not None:
                tokens[i] = sample(logits[i], seq)
        if penalized:
            assert self._seen is not None
            slots = [seqs[i].slot for i in penalized]
            self._seen[slots, [tokens[i] for i in penalized]] = True
        for i in guarded:
            record_ngram(seqs[i], tokens[i])
        return tokens

    def _penalize(
        self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]
    ) -> torch.Tensor:
        """HF's ``RepetitionPenaltyLogitsProcessor`` on ``rows``: the logit of every token the
        sequence's prompt or output holds is divided by the penalty where positive, multiplied
        where negative (in fp32, as ``generate`` runs its processors)."""
        if self._seen is None:
            self._seen = torch.zeros(
                self.num_slots, logits.shape[-1], dtype=torch.bool, device=logits.device
            )
        for i in rows:
            seq = seqs[i]
            if not seq.output_ids:  # its first token: the slot learns the prompt's tokens
                held = self._seen[seq.slot]
                held.zero_()  # an earlier owner's
                held[torch.tensor(seq.prompt_ids, device=held.device)] = True
        logits = logits.float()
        picked = logits[rows]
        seen = self._seen[[seqs[i].slot for i in rows]]
        penalty = torch.tensor([seqs[i].repetition_penalty for i in rows], device=logits.device)[
            :, None
        ]
        penalized = torch.where(picked < 0, picked * penalty, picked / penalty)
        logits[rows] = torch.where(seen, penalized, picked)
        return logits


class CheckpointRunner(SlotRunner):
    """A slot runner that loads its family from a checkpoint: what ``load_ocr_runner`` builds.
    A family's runner names the family's class in :attr:`FAMILY`."""

    #: Called as ``FAMILY(spec, device, vision_batch=...)``.
    FAMILY: ClassVar[Callable[..., Any]]

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
        """Load ``spec`` onto ``device`` with a KV cache of ``num_slots`` slots of
        ``max_model_len`` tokens, fewer if ``kv_budget_bytes`` holds fewer (see
        :class:`SlotRunner`); ``vision_batch`` caps the images (GOT-OCR2: tiles) per
        vision-tower call."""
        super().__init__(
            self.FAMILY(spec, device, vision_batch=vision_batch),
            num_slots=num_slots,
            max_model_len=max_model_len,
            kv_budget_bytes=kv_budget_bytes,
        )

    @property
    def model(self) -> Any:
        """The loaded transformers model."""
        return self.family.model  # type: ignore[attr-defined]  # every family keeps its model


def generation_defaults(generation_config: Any) -> tuple[float, int]:
    """What ``generate`` applies to a checkpoint's greedy decoding by default, from its
    generation config: the repetition penalty (Qwen2.5-VL's instruct checkpoints ship 1.05;
    1: none) and ``no_repeat_ngram_size`` (0: none)."""
    penalty = getattr(generation_config, "repetition_penalty", None)
    ngram = getattr(generation_config, "no_repeat_ngram_size", None)
    return (float(penalty) if penalty else 1.0), (int(ngram) if ngram else 0)


def banned_tokens(seq: Sequence) -> list[int]:
    """HF's ``NoRepeatNGramLogitsProcessor`` for one sequence: the tokens that would complete
    an n-gram its prompt and output already hold. Builds the sequence's n-gram index at its
    first token."""
    n = seq.no_repeat_ngram_size
    if seq.ngrams is None:
        ids = seq.prompt_ids + seq.output_ids
        seq.ngrams = {}
        for start in range(len(ids) - n + 1):
            seq.ngrams.setdefault(tuple(ids[start : start + n - 1]), set()).add(ids[start + n - 1])
    if seq.num_tokens + 1 < n:
        return []
    return sorted(seq.ngrams.get(_tail(seq, n - 1), ()))


def record_ngram(seq: Sequence, token: int) -> None:
    """Add the n-gram that ``token`` (not yet appended) completes to the sequence's index."""
    n = seq.no_repeat_ngram_size
    assert seq.ngrams is not None
    if seq.num_tokens + 1 >= n:
        seq.ngrams.setdefault(_tail(seq, n - 1), set()).add(token)


def _tail(seq: Sequence, k: int) -> tuple[int, ...]:
    """The sequence's last ``k`` tokens, prompt and output, without copying either whole."""
    if k <= 0:
        return ()
    out = seq.output_ids[-k:]
    if len(out) < k:
        out = seq.prompt_ids[len(out) - k :] + out
    return tuple(out)


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
