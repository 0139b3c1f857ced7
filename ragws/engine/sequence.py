"""A generation request's state inside the OCR engine.

Sequences are created by the engine when a request is submitted on the event loop, then owned
by the engine thread: only the scheduler and the runner mutate them. What a client sees leaves
through ``emit``, which the engine calls from its thread and which must be thread-safe (it hands
events to the event loop).

A sequence's ``seq_id`` is the engine's own (an int, unique in the engine); the client's id for
its request (``RequestId`` on the wire, which may collide across clients) never reaches the
engine.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ragws.engine.detokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # the model emitted end-of-text
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # cancel frame, closed socket, or a disconnected HTTP client
    ERROR = "error"  # the model failed on a step this sequence was in


@dataclass(slots=True)
class TokenEvent:
    """What the engine tells a request after a step: new text, and whether it is over."""

    text: str
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    scheduled_at: float | None = None
    # Line-based backends: where the line is in the image, and the recogniser's confidence.
    box: tuple[float, float, float, float] | None = None
    score: float | None = None


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a sequence draws its next token when it is not greedy (``Sequence.sampling`` None
    is greedy: the argmax, the engine's exact path)."""

    temperature: float = 1.0  # > 0
    top_p: float = 1.0  # in (0, 1]: the smallest set of tokens holding this much probability
    top_k: int = 0  # 0: every token; else only the k likeliest
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings: {self}")


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What a request asks of its generation, besides its prompt."""

    max_tokens: int  # the slot's end (max_model_len) may end the text sooner
    ignore_eos: bool = False
    sampling: Sampling | None = None  # None: greedy
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    # > 1 makes every token already in the prompt or the output less likely (HF's and vLLM's
    # repetition penalty); None: the checkpoint's generation config's.
    repetition_penalty: float | None = None
    # n > 0: no n-gram of the prompt and output occurs twice (HF's no_repeat_ngram_size,
    # MinerU's guard against loops); None: the checkpoint's generation config's.
    no_repeat_ngram_size: int | None = None

    def __post_init__(self) -> None:
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int  # the engine's id, unique in the engine; not the client's request id
    prompt_ids: list[int]
    image: Any  # the runner's prepared request (prompt, pixels) until the prefill ends, then None
    max_tokens: int
    stop_ids: frozenset[int]
    emit: Callable[[TokenEvent], None]
    ignore_eos: bool = False
    sampling: Sampling | None = None  # None: greedy
    repetition_penalty: float = 1.0  # 1: none (GenerationParams' resolved by the engine)
    no_repeat_ngram_size: int = 0  # 0: none (GenerationParams' resolved by the engine)
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    status: SeqStatus = SeqStatus.WAITING
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    detok: IncrementalDetokenizer | None = None  # set by the engine on submit
    rng: Any = None  # the runner's random generator, when sampling
    # With no_repeat_ngram_size n: each (n-1)-gram of prompt and output → the tokens that
    # followed it (the runner's, built at the first token and kept up to date).
    ngrams: dict[tuple[int, ...], set[int]] | None = None
    # Tokens whose keys and values are in the slot, or are being computed by the step being
    # run: the scheduler counts a step's tokens when it schedules them (a prompt chunk, or
    # the one token a decode feeds). A prompt longer than a step's budget is prefilled in
    # chunks over several steps; between steps, a decoding sequence has computed every token
    # but its last generated one.
    num_computed_tokens: int = 0
    # The prompt chunk the step being run prefills: its last ``prefill_chunk`` computed
    # tokens. None outside a scheduled prefill.
    prefill_chunk: int | None = None
    # The runner's image features, from the chunk that first needs them until the prefill has
    # passed the last image placeholder; dropped with the slot when the sequence ends.
    features: Any = None
    # Called on the engine thread when the sequence joins the running batch; must be
    # thread-safe (the OCR service disarms the request's deadline with it).
    on_start: Callable[[], None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens whose keys and values the KV cache must hold after the next decode step."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """Whether part of the prompt is still to be prefilled: nothing is sampled until the
        step that prefills its last chunk."""
        return self.num_computed_tokens < len(self.prompt_ids)

    @property
    def prefill_span(self) -> tuple[int, int]:
        """Prompt positions ``[start, end)`` that the step being run prefills: the chunk the
        scheduler counted last; the whole prompt for a sequence given to a runner without
        one."""
        if self.prefill_chunk is None:
            return 0, len(self.prompt_ids)
        return self.num_computed_tokens - self.prefill_chunk, self.num_computed_tokens

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token: int) -> FinishReason | None:
        """Record a generated token; return why the sequence ends, if it does."""
        self.output_ids.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in self.stop_ids and not self.ignore_eos:
            return FinishReason.STOP
        if len(self.output_ids) >= self.max_tokens:
            return FinishReason.LENGTH
        return None
