"""KV-cache slot accounting: which slot each running sequence owns.

The cache itself is a set of preallocated tensors ``[num_slots, kv_heads, max_model_len,
head_dim]`` per layer, owned by the model runner. This object only decides who owns which
slot, so "never exceed the cache" is one question the scheduler asks (:meth:`can_allocate`)
rather than checks scattered around. Slots are handed out lowest first, which keeps the
active slots dense at the front of the cache.
"""

from __future__ import annotations

import heapq


class SlotsExhausted(RuntimeError):
    pass


class SlotAllocator:
    def __init__(self, num_slots: int, max_model_len: int) -> None:
        if num_slots < 1 or max_model_len < 2:
            raise ValueError("need at least one slot of at least two tokens")
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self._owner: dict[int, int] = {}  # slot -> request id

    @property
    def used(self) -> int:
        return len(self._owner)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def fits(self, total_tokens: int) -> bool:
        """Whether a sequence of this many tokens (prompt + max new) fits one slot."""
        return total_tokens <= self.max_model_len

    def allocate(self, request_id: int) -> int:
        if not self._free:
            raise SlotsExhausted(f"all {self.num_slots} KV slots are in use")
        slot = heapq.heappop(self._free)
        self._owner[slot] = request_id
        return slot

    def free(self, slot: int) -> None:
        if self._owner.pop(slot, None) is None:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)

    def owner(self, slot: int) -> int | None:
        return self._owner.get(slot)
