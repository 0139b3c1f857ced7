"""The engine's loop, run synchronously by the runner tests: requests arrive and are aborted at
given steps, every step is schedule → run → postprocess on a real scheduler and runner, and a
log records what each step did, for the tests to assert on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragws.engine.kv_slots import SlotAllocator
from ragws.engine.runner import StepRunner
from ragws.engine.scheduler import Scheduler
from ragws.engine.sequence import Sampling, Sequence


@dataclass
class Request:
    image: np.ndarray
    mode: str
    max_tokens: int
    arrive: int = 0  # the engine step before which it reaches the scheduler
    crop: bool = False
    prompt: str | None = None
    sampling: Sampling | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


@dataclass
class StepLog:
    prefill: list[tuple[int, int]]  # (slot, prompt length) per sequence with a prompt chunk
    chunks: list[tuple[int, int, int]]  # (seq_id, start, end) per prompt chunk
    decode: list[int]  # slot per decoding sequence
    positions: list[int]  # per decoding sequence: the cache position of the token it feeds
    decoding: list[int]  # seq_id per decoding sequence
    encoded: list[int] = field(default_factory=list)  # seq_ids whose images the step encoded


@dataclass
class Run:
    seqs: list[Sequence]
    scheduler: Scheduler
    steps: list[StepLog] = field(default_factory=list)


def drive(
    runner: StepRunner,
    requests: list[Request],
    *,
    num_slots: int,
    max_prefill_tokens: int = 1024,
    aborts: dict[int, list[int]] | None = None,
    on_step: Callable[[int, Run], None] | None = None,
    encoded: list[Any] | None = None,
    max_steps: int = 500,
) -> Run:
    """Run ``requests`` to their end. ``aborts`` maps a step to the seq_ids aborted before it;
    ``on_step`` is called after every step; ``encoded``, a list the runner's image encoder
    appends each prepared request it encodes to, attributes the encodings to the steps."""
    scheduler = Scheduler(
        SlotAllocator(num_slots, runner.max_model_len), max_prefill_tokens=max_prefill_tokens
    )
    run = Run(seqs=[], scheduler=scheduler)
    owner: dict[int, int] = {}  # id of a prepared request -> its seq_id
    for i, req in enumerate(requests):
        prepared = runner.prepare(req.image, mode=req.mode, crop=req.crop, prompt=req.prompt)
        owner[id(prepared)] = i
        seq = Sequence(
            i,
            prepared.prompt_ids,
            prepared,
            req.max_tokens,
            runner.stop_ids,
            ignore,
            sampling=req.sampling,
            repetition_penalty=req.repetition_penalty,
            no_repeat_ngram_size=req.no_repeat_ngram_size,
        )
        run.seqs.append(seq)
    aborts = aborts or {}
    step = 0
    while step <= max(r.arrive for r in requests) or scheduler.has_work():
        for seq, req in zip(run.seqs, requests, strict=True):
            if req.arrive == step:
                scheduler.add(seq)
        for seq_id in aborts.get(step, []):
            scheduler.abort(seq_id)
        scheduled = scheduler.schedule()
        if scheduled:
            log = StepLog(
                prefill=[(s.slot, s.num_prompt_tokens) for s in scheduled.prefill],  # type: ignore[misc]
                chunks=[(s.seq_id, *s.prefill_span) for s in scheduled.prefill],
                decode=[s.slot for s in scheduled.decode],  # type: ignore[misc]
                positions=[s.num_tokens - 1 for s in scheduled.decode],
                decoding=[s.seq_id for s in scheduled.decode],
            )
            before = len(encoded) if encoded is not None else 0
            tokens = runner.step(scheduled.prefill, scheduled.decode)
            scheduler.postprocess(scheduled, tokens)
            if encoded is not None:
                log.encoded = [owner[id(p)] for p in encoded[before:]]
            run.steps.append(log)
        if on_step is not None:
            on_step(step, run)
        step += 1
        assert step < max_steps, "the engine loop does not end"
    return run


def ignore(event: Any) -> None:
    """An emit that drops the events (the tests read the sequences)."""
    pass
