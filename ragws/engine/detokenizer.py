"""Incremental detokenisation: text deltas as tokens arrive, never a broken character.

Byte-level BPE splits a multi-byte character over several tokens; decoding a prefix that ends
inside one yields U+FFFD. Decoding the whole sequence every step is quadratic, so, as vLLM
does, only a short window is decoded: the tokens since ``prefix_offset`` with and without the
newest ones, and the difference is the new text. Text ending in U+FFFD is held back until the
character completes. The invariant clients rely on: the concatenated deltas equal
``tokenizer.decode(all_ids, skip_special_tokens=True)``, cut before the first stop string when
the request has any (:class:`StopStrings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

REPLACEMENT = "\ufffd"
# Enough tokens of left context for a tokenizer's decode to treat the window like mid-text
# (leading-space handling, byte merges); vLLM uses the same figure.
CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(slots=True)
class StopStrings:
    """Text deltas cut before the first of ``stops``.

    A delta's tail that could be the start of a stop string is held back until the next delta
    settles it, so a stream never shows text that the stop then takes away.
    """

    stops: tuple[str, ...]
    held: str = ""
    stopped: bool = False  # a stop string was found: nothing more is released

    def release(self, delta: str, *, final: bool = False) -> str:
        """The part of ``delta`` (after what was held) that is certainly text; ``final``: the
        text is over, so nothing is held."""
        if self.stopped:
            return ""
        text = self.held + delta
        # The held part holds no whole stop string (it was checked), so the first match is
        # the earliest one.
        hits = [i for stop in self.stops if (i := text.find(stop)) >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return text[: min(hits)]
        keep = 0 if final else _partial_stop(text, self.stops)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins one of ``stops``."""
    return max(
        (
            k
            for stop in stops
            for k in range(min(len(stop) - 1, len(text)), 0, -1)
            if text.endswith(stop[:k])
        ),
        default=0,
    )


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Any
    skip_ids: frozenset[int] = frozenset()  # special tokens that never become text
    skip_special_tokens: bool = True  # other special tokens: left out of the text, or kept
    stop: StopStrings | None = None  # strings that end the text
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    emitted: list[str] = field(default_factory=list)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        if token in self.skip_ids:
            return ""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            delta = full[len(prefix) :]
            # Slide the window: what was read becomes left context for the next decode.
            self.prefix_offset = max(0, len(self.ids) - CONTEXT_TOKENS)
            self.read_offset = len(self.ids)
            self.emitted.append(delta)
            return self._release(delta)
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, even a broken character."""
        text = self._decode(self.ids)
        done = "".join(self.emitted)
        delta = text[len(done) :] if text.startswith(done) else ""
        if delta:
            self.emitted.append(delta)
        self.read_offset = len(self.ids)
        return self._release(delta, final=True)

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the text."""
        return self.stop is not None and self.stop.stopped

    @property
    def text(self) -> str:
        """Everything decoded so far, before any stop string cut it."""
        return "".join(self.emitted)

    def _release(self, delta: str, *, final: bool = False) -> str:
        return delta if self.stop is None else self.stop.release(delta, final=final)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
