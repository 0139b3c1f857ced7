"""The OCR engine: one thread running ``step() = schedule → run → postprocess`` forever.

Sequences join between steps and leave between steps. Requests and aborts from the event loop
land in an inbox that the thread drains at the top of every step, so a cancelled sequence
leaves the batch, and its KV slot is free, before the next step runs. Tokens leave through each
sequence's ``emit`` (thread-safe), already detokenised into text deltas. A sequence joins the
waiting queue of the client that submitted it (:mod:`ragws.runtime.fairness`), read on the event
loop at submit time, and the scheduler admits clients in turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ragws.engine.detokenizer import IncrementalDetokenizer, StopStrings
from ragws.engine.kv_slots import SlotAllocator
from ragws.engine.scheduler import ScheduledStep, Scheduler
from ragws.engine.sequence import FinishReason, Sequence, TokenEvent
from ragws.runtime import fairness

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    """A model adapter that can run one engine step (see ``ragws.models.got_ocr2``)."""

    tokenizer: Any
    stop_ids: frozenset[int]
    num_slots: int
    max_model_len: int

    def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int]: ...


@dataclass(slots=True)
class EngineStats:
    """Reported after every step, for metrics."""

    running: int
    waiting: int
    slots_used: int
    batch_size: int  # sequences that got a token this step (0: a report between steps)
    ttft_s: list[float]
    step_s: float


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
        self.on_step = on_step
        self._inbox: deque[tuple[str, Any]] = deque()  # append/popleft are thread-safe
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ragws-ocr", daemon=True)
        self.healthy = True
        self.steps = 0

    # --- event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq`` for the client of the request running in this context."""
        self._inbox.append(("add", (seq, fairness.current.get())))
        self._wake.set()

    def abort(self, request_id: int) -> None:
        self._inbox.append(("abort", request_id))
        self._wake.set()

    # --- engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self.step()
        except BaseException:
            # Not a step's error (those fail the step's sequences): the thread cannot go on.
            # /health turns unhealthy, new requests are refused at once, and every sequence
            # the engine holds is failed below rather than left waiting.
            self.healthy = False
            log.critical("OCR engine thread died", exc_info=True)
        finally:
            self._fail_all("the OCR engine stopped")

    def _drain_inbox(self) -> None:
        if not self._inbox:
            return
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                seq, client = item
                seq.detok = IncrementalDetokenizer(
                    self.runner.tokenizer,
                    self.runner.stop_ids,
                    skip_special_tokens=seq.skip_special_tokens,
                    stop=StopStrings(seq.stop) if seq.stop else None,
                )
                self.scheduler.add(seq, client)
            else:
                aborted = self.scheduler.abort(item)
                if aborted is not None:
                    self._emit_end(aborted, FinishReason.CANCELLED)
        # Gauges move now, not at the next step: an abort may leave nothing to step.
        self._report(batch_size=0, ttft_s=[], step_s=0.0)

    def step(self) -> None:
        started = time.monotonic()
        step = self.scheduler.schedule()
        if not step:
            return
        for seq in step.prefill:
            seq.scheduled_at = started
            if seq.on_start is not None:
                seq.on_start()
        try:
            tokens = self.runner.step(step.prefill, step.decode)
        except Exception as exc:
            recovered = self._recover(step, exc)
            if recovered is None:
                self._report(batch_size=0, ttft_s=[], step_s=time.monotonic() - started)
                return
            tokens = recovered
        self.steps += 1
        finished = set(self.scheduler.postprocess(step, tokens))
        ttft: list[float] = []
        for seq in step.prefill + step.decode:
            if seq.finish_reason is FinishReason.CANCELLED:
                continue
            if seq in step.prefill and seq.first_token_at is not None:
                ttft.append(seq.first_token_at - seq.arrived_at)
            text = seq.detok.push(seq.last_token)
            if seq in finished:
                self._emit_end(seq, seq.finish_reason, text + seq.detok.flush())
            elif seq.detok.stopped:  # a stop string: the sequence ends, its slot free now
                self.scheduler.finish(seq, FinishReason.STOP)
                self._emit_end(seq, FinishReason.STOP, text)
            elif text:
                seq.emit(self._event(seq, text))
        self._report(batch_size=len(tokens), ttft_s=ttft, step_s=time.monotonic() - started)

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

    def _recover(self, step: ScheduledStep, exc: Exception) -> list[int] | None:
        """A step raised (a model error, or out of memory): fail only what it must.

        When the step admitted new sequences, they are the likely cause (a prefill's vision
        encoding and prompt are the step's largest allocations), and the runner does their
        work first, before the running sequences' KV cache is touched. So the newcomers fail,
        and the running sequences' decode is tried again alone: if it goes through, their
        streams go on as if nothing happened. Otherwise the running sequences fail too.
        Either way their slots are free before the next step. Returns the decode tokens, or
        None when nothing is left of the step.
        """
        error = f"{type(exc).__name__}: {exc}"
        log.error(
            "OCR step failed (%d new, %d running): %s", len(step.prefill), len(step.decode), error
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
        never_added = [item[0] for kind, item in self._inbox if kind == "add"]
        self._inbox.clear()
        waiting = self.scheduler.waiting.drain()
        self._fail([*self.scheduler.running, *waiting, *never_added], error)
