"""Negative lookups, cached briefly (pure): videos that are missing, blocked or deleted.

A player that keeps asking for a taken-down or unknown video costs control one database read
per request; these answers are the ones that do not change often, so they are remembered for a
short TTL (`TTL_SECONDS`) and answered from memory.

Rules:
- `get(key, now)` is the remembered value, or None when absent or older than the TTL;
- `put(key, value, now, epoch)` remembers a value read from the database; `epoch` is `epoch`
  as it was *before* that read: if anything was invalidated since (`forget`), the read may be
  older than the change and is not kept (else an unblock racing a lookup could be hidden
  behind a stale 451 for a whole TTL);
- `forget(key)` drops one key (block, unblock, delete and restore call it in the same process;
  other control processes see the change within the TTL);
- at most `max_entries` keys: when full, expired entries go first, then the oldest (one TTL
  for all, so the oldest entry is the first to expire).
`now` is passed in (a monotonic clock); nothing here does I/O.
"""

from __future__ import annotations

TTL_SECONDS = 2.0
MAX_ENTRIES = 10_000
MISSING = "MISSING"  # the value for "no such video"


class NegativeCache:
    def __init__(self, ttl: float = TTL_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        if ttl < 0 or max_entries < 1:
            raise ValueError("ttl must be >= 0 and max_entries >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.epoch = 0
        self._entries: dict[str, tuple[float, str]] = {}  # key -> (expires, value), oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> str | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if now >= hit[0]:
            del self._entries[key]
            return None
        return hit[1]

    def put(self, key: str, value: str, now: float, epoch: int) -> bool:
        """Remember `value`; False (nothing kept) when an invalidation happened since `epoch`
        or the TTL is zero."""
        if epoch != self.epoch or self.ttl <= 0:
            return False
        self._entries.pop(key, None)  # re-inserted last: insertion order is age order
        if len(self._entries) >= self.max_entries:
            self._evict(now)
        self._entries[key] = (now + self.ttl, value)
        return True

    def forget(self, key: str) -> None:
        self.epoch += 1
        self._entries.pop(key, None)

    def _evict(self, now: float) -> None:
        # One TTL for all and re-insertion on put: the oldest entry expires first, so expired
        # ones are at the front, and so is the one to drop when none has expired.
        while self._entries:
            key, (expires, _value) = next(iter(self._entries.items()))
            if now < expires and len(self._entries) < self.max_entries:
                break
            del self._entries[key]
