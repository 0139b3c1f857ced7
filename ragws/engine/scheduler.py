"""Iteration-level scheduling: who prefills and who decodes in the next step.

One rule, as in vLLM v1, instead of prefill and decode phases: each sequence's computed tokens
(``Sequence.num_computed_tokens``) catch up with its tokens under a per-step prompt-token budget
(``max_prefill_tokens``). Every step, in this order:

1. every running sequence whose prompt is prefilled decodes one token (decode has priority and
   is not counted against the budget, so no running stream ever stalls for a prefill);
2. sequences admitted earlier whose prompt is only partly prefilled, in admission order, each
   get the next chunk of it: ``min(rest of the prompt, budget left)`` tokens;
3. waiting sequences are admitted into free KV slots while the budget lasts. A prompt the
   budget can hold whole is prefilled whole: it is admitted when what is left of the budget
   holds it, and otherwise waits for the next step (and the turn waits with it). A prompt
   longer than the whole budget could never be, so it is admitted with what is left and
   prefilled in chunks over the next steps.

A sequence is sampled only in the step that prefills its prompt's last chunk (its first token);
until then the runner gives it no token. A prefill therefore delays running decodes by at most
one step's budget of prompt tokens, however long the prompt.

Waiting sequences are admitted clients in turn (:class:`~ragws.runtime.fairness.FairQueue`): one
FIFO per client, one sequence from each in round robin, so a client with dozens of sequences queued
delays another client's one by at most one admission per active client, not by all of them.

Lengths are one question to the slot allocator (:meth:`Scheduler.fits`): a sequence is accepted
only if its prompt and a first token fit a slot, and it ends (``length``) when its next token
would not, so no sequence ever outgrows its slot and nothing else checks lengths.

The scheduler never touches tensors and runs on the engine thread only (but for
:meth:`Scheduler.fits`, which reads only the slot size); requests and aborts from the event loop
reach it through the engine's inbox.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from ragws.engine.kv_slots import SlotAllocator
from ragws.engine.sequence import FinishReason, SeqStatus, Sequence
from ragws.runtime.fairness import FairQueue


@dataclass(slots=True)
class ScheduledStep:
    # Prompt chunks (``seq.prefill_span``): the partly prefilled sequences first (admission
    # order), then the newly admitted ones.
    prefill: list[Sequence] = field(default_factory=list)
    # Running with their prompt prefilled: one token each.
    decode: list[Sequence] = field(default_factory=list)
    # Admitted now (the tail of ``prefill``): they join the running batch.
    admitted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, slots: SlotAllocator, *, max_prefill_tokens: int) -> None:
        self.slots = slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: FairQueue[Sequence] = FairQueue()
        self.running: list[Sequence] = []  # in admission order, partly prefilled ones included

    def add(self, seq: Sequence, client: Hashable | None = None) -> None:
        self.waiting.push(seq, client)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits(self, seq: Sequence) -> bool:
        """Whether ``seq`` with one more token fits its KV slot: before it is queued (its prompt
        and a first token), and after each token it gets. Its prompt and output never outnumber
        ``max_model_len``, so a decode never writes past the slot's end."""
        return self.slots.fits(seq.num_tokens + 1)

    def schedule(self) -> ScheduledStep:
        """The next step: decodes, then prompt chunks under the budget (see the module)."""
        step = ScheduledStep()
        budget = self.max_prefill_tokens
        for seq in self.running:
            if not seq.in_prefill:
                seq.num_computed_tokens += 1  # the token it feeds
                step.decode.append(seq)
            elif budget > 0:
                budget -= self._chunk(step, seq, budget)
        while budget > 0 and self.slots.can_allocate() and (seq := self.waiting.peek()) is not None:
            # A prompt the budget holds whole is never split: it waits for a step with room.
            if budget < seq.num_prompt_tokens <= self.max_prefill_tokens:
                break
            self.waiting.pop()
            seq.slot = self.slots.allocate(seq.seq_id)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            step.admitted.append(seq)
            budget -= self._chunk(step, seq, budget)
        return step

    def _chunk(self, step: ScheduledStep, seq: Sequence, budget: int) -> int:
        """Schedule the next chunk of ``seq``'s prompt within ``budget``; return its size."""
        chunk = min(seq.num_prompt_tokens - seq.num_computed_tokens, budget)
        seq.prefill_chunk = chunk
        seq.num_computed_tokens += chunk
        step.prefill.append(seq)
        return chunk

    def postprocess(self, step: ScheduledStep, tokens: list[int | None]) -> list[Sequence]:
        """Append each sequence's new token (prefill first, then decode order; None for a
        prompt chunk short of the prompt's end, which samples nothing); return those that
        finished, with their slots already free. The slot's end ends a sequence like its
        ``max_tokens`` does (``length``)."""
        for seq in step.prefill:
            seq.prefill_chunk = None
        finished: list[Sequence] = []
        for seq, token in zip(step.prefill + step.decode, tokens, strict=True):
            if seq.status is not SeqStatus.RUNNING:  # aborted while the step ran
                continue
            if (token is None) != seq.in_prefill:
                raise RuntimeError(
                    f"sequence {seq.seq_id}: a token is due exactly when its prompt is prefilled"
                )
            if token is None:
                continue
            reason = seq.append(token)
            if reason is None and not self.fits(seq):
                reason = FinishReason.LENGTH
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a sequence wherever it is and free its slot; None if it already ended."""
        queued = next((seq for seq in self.waiting if seq.seq_id == seq_id), None)
        if queued is not None:
            self.waiting.remove(queued)
            queued.status = SeqStatus.FINISHED
            queued.finish_reason = FinishReason.CANCELLED
            return queued
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.finish(seq, FinishReason.CANCELLED)
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None
        # A sequence ended mid-prefill still holds its pixels and image features: let go.
        seq.image = seq.features = None
