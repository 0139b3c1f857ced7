"""Iteration-level scheduling: who prefills and who decodes in the next step.

One rule, as in vLLM v1, instead of prefill and decode phases: every running sequence decodes
one token every step (decode has priority, so no running stream ever stalls for a whole
prefill phase), and waiting sequences are admitted into free KV slots while a per-step prompt
token budget lasts. A newcomer's prefill therefore delays running decodes by at most one
step's worth of prompt tokens.

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
    # Admitted now: encode, prefill, first token.
    prefill: list[Sequence] = field(default_factory=list)
    # Running: one token each.
    decode: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, slots: SlotAllocator, *, max_prefill_tokens: int) -> None:
        self.slots = slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: FairQueue[Sequence] = FairQueue()
        self.running: list[Sequence] = []

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
        step = ScheduledStep(decode=list(self.running))
        budget = self.max_prefill_tokens
        while self.slots.can_allocate() and (seq := self.waiting.peek()) is not None:
            # The first admission always fits, so a prompt longer than the budget still runs.
            if step.prefill and seq.num_prompt_tokens > budget:
                break
            self.waiting.pop()
            seq.slot = self.slots.allocate(seq.seq_id)
            seq.status = SeqStatus.RUNNING
            step.prefill.append(seq)
            budget -= seq.num_prompt_tokens
        self.running.extend(step.prefill)
        return step

    def postprocess(self, step: ScheduledStep, tokens: list[int]) -> list[Sequence]:
        """Append each sequence's new token (prefill first, then decode order); return those
        that finished, with their slots already free. The slot's end ends a sequence like its
        ``max_tokens`` does (``length``)."""
        finished: list[Sequence] = []
        for seq, token in zip(step.prefill + step.decode, tokens, strict=True):
            if seq.status is not SeqStatus.RUNNING:  # aborted while the step ran
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
