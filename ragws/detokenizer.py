"""Incremental detokenisation: text deltas as tokens arrive, never a broken character.

Byte-level BPE splits a multi-byte character over several tokens; decoding a prefix that ends
inside one yields U+FFFD. Decoding the whole sequence every step is quadratic, so, as vLLM
does, only a short window is decoded: the tokens since ``prefix_offset`` with and without the
newest ones, and the difference is the new text. Text ending in U+FFFD is held back until the
character completes. The invariant clients rely on: the concatenated deltas equal
``tokenizer.decode(all_ids, skip_special_tokens=True)``.
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
class IncrementalDetokenizer:
    tokenizer: Any
    skip_ids: frozenset[int] = frozenset()  # special tokens that never become text
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
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, even a broken character."""
        text = self._decode(self.ids)
        done = "".join(self.emitted)
        delta = text[len(done) :] if text.startswith(done) else ""
        if delta:
            self.emitted.append(delta)
        self.read_offset = len(self.ids)
        return delta

    @property
    def text(self) -> str:
        return "".join(self.emitted)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
