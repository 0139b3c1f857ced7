"""KV-cache slot accounting: which slot each running sequence owns, and what fits a slot.

The cache itself is a set of preallocated tensors ``[num_slots, kv_heads, max_model_len,
head_dim]`` per layer, owned by the model runner. This object only decides who owns which
slot, so "never exceed the cache" is one question the scheduler asks (:meth:`can_allocate`), and
"does this sequence fit its slot" another (:meth:`fits`), rather than checks scattered around.
Slots are handed out lowest first, which keeps the active slots dense at the front of the cache.
"""

from __future__ import annotations

import heapq


class SlotsExhausted(RuntimeError):
    pass


def slots_in_budget(
    num_slots: int, *, max_model_len: int, token_bytes: int, budget_bytes: int | None
) -> int:
    """How many slots of ``max_model_len`` tokens (``token_bytes`` each) a KV cache of
    ``budget_bytes`` holds, at most ``num_slots``; None: no budget, ``num_slots``."""
    slot_bytes = token_bytes * max_model_len
    if budget_bytes is not None:
        fit = budget_bytes // slot_bytes
        if fit < 1:
            raise ValueError(
                f"kv_budget_bytes={budget_bytes} holds no slot of {max_model_len} tokens "
                f"({slot_bytes} bytes each)"
            )
        num_slots = min(num_slots, fit)
    if num_slots < 1:
        raise ValueError("num_slots must be at least 1")
    return num_slots


class SlotAllocator:
    def __init__(self, num_slots: int, max_model_len: int) -> None:
        if num_slots < 1 or max_model_len < 2:
            raise ValueError("need at least one slot of at least two tokens")
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self._owner: dict[int, int] = {}  # slot -> seq id

    @property
    def used(self) -> int:
        return len(self._owner)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def fits(self, total_tokens: int) -> bool:
        """Whether a sequence of this many tokens (prompt and output) fits one slot.

        Reads only the slot size, which never changes: safe from any thread.
        """
        return total_tokens <= self.max_model_len

    def allocate(self, seq_id: int) -> int:
        if not self._free:
            raise SlotsExhausted(f"all {self.num_slots} KV slots are in use")
        slot = heapq.heappop(self._free)
        self._owner[slot] = seq_id
        return slot

    def free(self, slot: int) -> None:
        if self._owner.pop(slot, None) is None:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)

    def owner(self, slot: int) -> int | None:
        return self._owner.get(slot)
