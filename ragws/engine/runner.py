"""The model runner: what the engine needs of a model, whatever its family.

The engine owns one runner and is the only one to call it. On a worker thread it asks the
runner to :meth:`~StepRunner.prepare` a request (image and options in, prompt ids and pixel
inputs out; no GPU), and on the engine thread to :meth:`~StepRunner.step` (tensors in, one token
per sequence out). The runner never decides who runs; the engine never touches tensors.

:class:`ragws.models.slot_runner.SlotRunner` implements this over a preallocated slot KV cache
for any decoder-only vision-language family (:mod:`ragws.models.got_ocr2` is one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from ragws.engine.sequence import Sequence


class Prepared(Protocol):
    """A prepared request: its prompt, and whatever else its prefill needs (the pixels). It is
    the sequence's ``image`` until the prefill's last chunk, which drops it."""

    prompt_ids: list[int]


@dataclass(frozen=True, slots=True)
class Tasks:
    """What a model can be asked to do: the ``mode`` values a request may name, and how
    ``parse`` reads with it: an element-level model each layout region with its kind's task (a
    table with its table task, a formula with its formula task), a page-level model a page
    without a text layer whole."""

    architecture: str  # the checkpoint's ``architectures`` entry
    modes: tuple[str, ...]
    regions: Mapping[str, str] = field(default_factory=dict)  # region kind → mode
    default: str = "plain"  # the mode of every other region
    markup: bool = True  # tables and formulas come back as markup (HTML/markdown, LaTeX)
    # A page-level model's mode for a whole page: parse sends it pages without a text layer
    # whole, not their regions. None: an element-level model.
    page: str | None = None

    def mode_for(self, kind: str) -> str:
        return self.regions.get(kind, self.default)


class StepRunner(Protocol):
    """A model adapter that prepares requests and runs engine steps."""

    name: str  # the model, as /health and the hello frame name it
    tasks: Tasks
    tokenizer: Any  # decodes the generated ids (``decode(ids, skip_special_tokens=...)``)
    stop_ids: frozenset[int]  # tokens that end a sequence (unless it ignores them)
    repetition_penalty: float  # the checkpoint's generation config's (1: none)
    no_repeat_ngram_size: int  # the checkpoint's generation config's (0: none)
    num_slots: int  # sequences that can run at once: one KV slot each
    max_model_len: int  # tokens (prompt and output) one slot holds

    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache holds (allocated once, at load)."""
        ...

    def prepare(
        self,
        image: np.ndarray,
        *,
        mode: str = "format",
        crop: bool = False,
        prompt: str | None = None,
        system: str | None = None,
    ) -> Prepared:
        """One RGB ``H×W×3`` page and the request's options as a prompt. Thread-safe (runs on
        the worker pool, beside steps); ValueError for options the model cannot take."""
        ...

    def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int | None]:
        """Each ``prefill`` sequence's prompt chunk, then the next token of each ``decode``
        sequence; the tokens in that order.

        A ``prefill`` sequence has a KV slot and its prepared request as ``image``; its chunk is
        the prompt's tokens ``[start, end)`` = ``prefill_span`` (earlier steps left the keys
        and values of ``[0, start)`` in the slot). The chunk that ends the prompt gives the
        sequence's first token; a chunk short of it gives None.

        The prefill's work comes first, so that when it raises, the decoding sequences' cache
        is untouched and the engine can run their decode again alone.
        """
        ...
