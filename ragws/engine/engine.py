"""The OCR engine: one thread running ``step() = schedule → run → postprocess`` forever.

The engine owns its model runner (:mod:`ragws.engine.runner`): the OCR service asks it to
:meth:`~OcrEngine.prepare` a request (on the worker pool), to :meth:`~OcrEngine.submit` the
prepared request, and to :meth:`~OcrEngine.abort` it, and never touches the runner itself.

Sequences join between steps and leave between steps. Submissions and aborts from the event
loop land in an inbox (typed items) that each step drains first, the one point where sequences
are added and aborted, so a cancelled sequence leaves the batch, and its KV slot is free, before
the step's schedule. Tokens leave through each sequence's ``emit`` (thread-safe), already
detokenised into text deltas. A sequence joins the waiting queue of the client that submitted it
(:mod:`ragws.runtime.fairness`), read on the event loop at submit time, and the scheduler admits
clients in turn.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ragws.engine.detokenizer import IncrementalDetokenizer, StopStrings
from ragws.engine.kv_slots import SlotAllocator
from ragws.engine.runner import Prepared, StepRunner, Tasks
from ragws.engine.scheduler import ScheduledStep, Scheduler
from ragws.engine.sequence import FinishReason, GenerationParams, Sequence, TokenEvent
from ragws.runtime import fairness
from ragws.runtime.threads import single_openmp_thread

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "EngineLimits",
    "EngineStats",
    "OcrEngine",
    "PromptTooLong",
    "StepRunner",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """Reported after every step, for metrics."""

    running: int
    waiting: int
    slots_used: int
    batch_size: int  # sequences that got a token this step (0: a report between steps)
    ttft_s: list[float]
    step_s: float


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine's capacity, as reports (``/health``, metrics) show it."""

    num_slots: int  # sequences decoding at once
    max_model_len: int  # tokens (prompt and output) of one sequence
    kv_cache_bytes: int


class PromptTooLong(ValueError):
    """A prepared prompt leaves no room in a KV slot for a single generated token."""


@dataclass(frozen=True, slots=True)
class AddSequence:
    """Inbox: queue ``seq`` for ``client`` (its fair-share queue)."""

    seq: Sequence
    client: Hashable | None


@dataclass(frozen=True, slots=True)
class AbortSequence:
    """Inbox: end sequence ``seq_id`` (cancelled) and free its slot."""

    seq_id: int


InboxItem = AddSequence | AbortSequence


class OcrEngine:
    def __init__(
        self,
        runner: StepRunner,
        *,
        max_prefill_tokens: int,
        on_step: Callable[[EngineStats], None] | None = None,
    ) -> None:
        self.runner = runner
        self.slots = SlotAllocator(runner.num_slots, runner.max_model_len)
        self.scheduler = Scheduler(self.slots, max_prefill_tokens=max_prefill_tokens)
        self.limits = EngineLimits(runner.num_slots, runner.max_model_len, runner.kv_cache_bytes())
        self.on_step = on_step
        self._inbox: deque[InboxItem] = deque()  # append/popleft are thread-safe
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ragws-ocr", daemon=True)
        self._seq_ids = itertools.count(1)
        self.healthy = True
        self.steps = 0

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def tasks(self) -> Tasks:
        """What the model can be asked (its modes, the mode per kind of layout region)."""
        return self.runner.tasks

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a KV slot (read off the engine thread: a momentary count)."""
        return len(self.scheduler.waiting)

    # --- event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def prepare(
        self,
        image: np.ndarray,
        *,
        mode: str = "format",
        crop: bool = False,
        prompt: str | None = None,
        system: str | None = None,
    ) -> Prepared:
        """The runner's preprocessing of one RGB page (blocking, no GPU: call it on a worker
        thread, whose OpenMP regions then run on it alone, :mod:`ragws.runtime.threads`).
        ValueError for options the model cannot take."""
        single_openmp_thread()
        return self.runner.prepare(image, mode=mode, crop=crop, prompt=prompt, system=system)

    def submit(
        self,
        prompt: Prepared,
        params: GenerationParams,
        emit: Callable[[TokenEvent], None],
        *,
        on_start: Callable[[], None] | None = None,
    ) -> int:
        """Queue a prepared request for the client of the request running in this context;
        return its ``seq_id`` (for :meth:`abort`).

        ``emit`` gets its events on the engine thread, ``on_start`` is called there when it
        joins the running batch; both must be thread-safe. PromptTooLong when the prompt leaves
        no room in a KV slot.
        """
        seq = Sequence(
            seq_id=next(self._seq_ids),
            prompt_ids=prompt.prompt_ids,
            image=prompt,
            max_tokens=params.max_tokens,
            stop_ids=self.runner.stop_ids,
            emit=emit,
            ignore_eos=params.ignore_eos,
            sampling=params.sampling,
            repetition_penalty=(
                self.runner.repetition_penalty
                if params.repetition_penalty is None
                else params.repetition_penalty
            ),
            no_repeat_ngram_size=(
                self.runner.no_repeat_ngram_size
                if params.no_repeat_ngram_size is None
                else params.no_repeat_ngram_size
            ),
            stop=params.stop,
            skip_special_tokens=params.skip_special_tokens,
            on_start=on_start,
        )
        if not self.scheduler.fits(seq):
            raise PromptTooLong(
                f"the prompt is {seq.num_prompt_tokens} tokens; max_model_len is "
                f"{self.slots.max_model_len}"
            )
        seq.detok = IncrementalDetokenizer(
            self.runner.tokenizer,
            self.runner.stop_ids,
            skip_special_tokens=seq.skip_special_tokens,
            stop=StopStrings(seq.stop) if seq.stop else None,
        )
        self._send(AddSequence(seq, fairness.current.get()))
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        self._send(AbortSequence(seq_id))

    def _send(self, item: InboxItem) -> None:
        self._inbox.append(item)
        self._wake.set()

    # --- engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if self._inbox or self.scheduler.has_work():
                    self.step()
                    continue
                # A submission between the check and the wait has set the event already; one
                # between the wait and the clear is in the inbox, which the loop checks first.
                self._wake.wait()
                self._wake.clear()
        except BaseException:
            # Not a step's error (those fail the step's sequences): the thread cannot go on.
            # /health turns unhealthy, new requests are refused at once, and every sequence
            # the engine holds is failed below rather than left waiting.
            self.healthy = False
            log.critical("OCR engine thread died", exc_info=True)
        finally:
            self._fail_all("the OCR engine stopped")

    def step(self) -> None:
        """One iteration: take in submissions and aborts, schedule, run the model,
        postprocess (tokens to text, finished sequences out), report."""
        self._drain_inbox()
        started = time.monotonic()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return
        self._start(scheduled.admitted, started)
        tokens = self._run(scheduled)
        ttft = [] if tokens is None else self._postprocess(scheduled, tokens)
        batch_size = 0 if tokens is None else sum(token is not None for token in tokens)
        self._report(batch_size=batch_size, ttft_s=ttft, step_s=time.monotonic() - started)

    def _drain_inbox(self) -> None:
        """The one point where sequences join the scheduler and aborts take effect."""
        if not self._inbox:
            return
        while self._inbox:
            match self._inbox.popleft():
                case AddSequence(seq, client):
                    self.scheduler.add(seq, client)
                case AbortSequence(seq_id):
                    aborted = self.scheduler.abort(seq_id)
                    if aborted is not None:
                        self._emit_end(aborted, FinishReason.CANCELLED)
        # Gauges move now, not at the next step: an abort may leave nothing to step.
        self._report(batch_size=0, ttft_s=[], step_s=0.0)

    def _start(self, admitted: list[Sequence], now: float) -> None:
        """Sequences joining the running batch: their start time, and their start hooks."""
        for seq in admitted:
            seq.scheduled_at = now
            if seq.on_start is not None:
                seq.on_start()

    def _run(self, scheduled: ScheduledStep) -> list[int | None] | None:
        """The runner's tokens for the step; on an error, what :meth:`_recover` saves."""
        try:
            tokens = self.runner.step(scheduled.prefill, scheduled.decode)
        except Exception as exc:
            tokens = self._recover(scheduled, exc)
        if tokens is not None:
            self.steps += 1
        return tokens

    def _postprocess(self, scheduled: ScheduledStep, tokens: list[int | None]) -> list[float]:
        """Append the tokens, end finished sequences and send each its new text; return the
        times to first token of the sequences whose prompt this step completed. A prompt
        chunk short of its prompt's end got no token: nothing to send."""
        finished = set(self.scheduler.postprocess(scheduled, tokens))
        for seq, token in zip(scheduled.prefill + scheduled.decode, tokens, strict=True):
            if token is not None and seq.finish_reason is not FinishReason.CANCELLED:
                self._emit_text(seq, finished=seq in finished)
        return [
            seq.first_token_at - seq.arrived_at
            for seq in scheduled.prefill
            if seq.finish_reason is not FinishReason.CANCELLED and seq.first_token_at is not None
        ]

    def _emit_text(self, seq: Sequence, *, finished: bool) -> None:
        """Detokenise the sequence's new token and send the text it completes."""
        assert seq.detok is not None  # set on submit
        text = seq.detok.push(seq.last_token)
        if finished:
            self._emit_end(seq, seq.finish_reason, text + seq.detok.flush())
        elif seq.detok.stopped:  # a stop string: the sequence ends, its slot free now
            self.scheduler.finish(seq, FinishReason.STOP)
            self._emit_end(seq, FinishReason.STOP, text)
        elif text:
            seq.emit(self._event(seq, text))

    def _report(self, *, batch_size: int, ttft_s: list[float], step_s: float) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(
                EngineStats(
                    running=len(self.scheduler.running),
                    waiting=len(self.scheduler.waiting),
                    slots_used=self.slots.used,
                    batch_size=batch_size,
                    ttft_s=ttft_s,
                    step_s=step_s,
                )
            )
        except Exception:  # metrics must never take the engine down
            log.exception("OCR on_step hook failed")

    def _event(self, seq: Sequence, text: str, reason: FinishReason | None = None) -> TokenEvent:
        return TokenEvent(
            text=text,
            finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=len(seq.output_ids),
            first_token_at=seq.first_token_at,
            scheduled_at=seq.scheduled_at,
        )

    def _emit_end(self, seq: Sequence, reason: FinishReason | None, text: str = "") -> None:
        seq.emit(self._event(seq, text, reason))

    def _recover(self, step: ScheduledStep, exc: Exception) -> list[int | None] | None:
        """A step raised (a model error, or out of memory): fail only what it must.

        When the step prefilled prompt chunks, their sequences are the likely cause (a
        prefill's vision encoding and prompt are the step's largest allocations), and the
        runner does their work first, before the decoding sequences' KV cache is touched. So
        the prefilling sequences fail (newcomers and partly prefilled ones alike), and the
        running sequences' decode is tried again alone: if it goes through, their streams go
        on as if nothing happened. Otherwise the running sequences fail too. Either way their
        slots are free before the next step. Returns the decode tokens, or None when nothing
        is left of the step.
        """
        error = f"{type(exc).__name__}: {exc}"
        log.error(
            "OCR step failed (%d prefilling, %d decoding): %s",
            len(step.prefill),
            len(step.decode),
            error,
        )
        self._fail(step.prefill, error)
        step.prefill = []
        if not step.decode:
            return None
        try:
            return self.runner.step([], step.decode)
        except Exception as again:
            log.exception("OCR decode failed again for %d sequences", len(step.decode))
            self._fail(step.decode, f"{type(again).__name__}: {again}")
            return None

    def _fail(self, seqs: list[Sequence], error: str) -> None:
        for seq in seqs:
            self.scheduler.finish(seq, FinishReason.ERROR)
            event = self._event(seq, "", FinishReason.ERROR)
            event.error = error
            seq.emit(event)

    def _fail_all(self, error: str) -> None:
        never_added = [item.seq for item in self._inbox if isinstance(item, AddSequence)]
        self._inbox.clear()
        waiting = self.scheduler.waiting.drain()
        self._fail([*self.scheduler.running, *waiting, *never_added], error)
