"""Where the cache keeps whole responses: a small core interface and the memory backend.

Rules:
- An entry is a whole 200 response: status, the end-to-end headers worth replaying, the full
  body, and what RFC 9111 §4.2.3 needs to compute its age. Partial (206) bodies are never stored.
- A backend is bounded in bytes (body plus a header estimate). An entry larger than
  `max_object_bytes` or than the whole budget is refused (`put` returns False) and the caller
  passes it through; otherwise least-recently-used entries are evicted until it fits.
- Backends do no I/O on the event loop beyond memory; a disk backend (issue 3) implements the
  same four methods.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from vodcore.cache.policy import AgeInputs

ENTRY_OVERHEAD = 256  # bookkeeping per entry, so many tiny objects still count against the budget


@dataclass(frozen=True, slots=True)
class CachedResponse:
    key: str
    status: int
    headers: tuple[tuple[str, str], ...]  # end-to-end fields, original case, no Date/Age
    body: bytes
    age: AgeInputs
    lifetime: float | None  # freshness lifetime (RFC 9111 §4.2.1) fixed when stored
    etag: str | None
    last_modified: float | None

    @property
    def stored_at(self) -> float:
        return self.age.response_time

    @property
    def charge(self) -> int:
        """Bytes this entry counts against the budget."""
        return (
            len(self.body)
            + sum(len(k) + len(v) + 4 for k, v in self.headers)
            + len(self.key)
            + ENTRY_OVERHEAD
        )


class CacheStorage(Protocol):
    """The core every cache backend implements."""

    bytes_used: int  # what the entries charge against the budget now

    def __len__(self) -> int: ...

    def get(self, key: str) -> CachedResponse | None: ...

    def put(self, entry: CachedResponse) -> bool:
        """Store (replacing any entry under the same key); False if it can never fit."""

    def delete(self, key: str) -> bool: ...

    def clear(self) -> None: ...


class MemoryStorage:
    """An LRU over an OrderedDict, bounded by `budget_bytes`."""

    def __init__(self, budget_bytes: int, max_object_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.max_object_bytes = max_object_bytes
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)  # most recently used
        return entry

    def put(self, entry: CachedResponse) -> bool:
        charge = entry.charge
        if len(entry.body) > self.max_object_bytes or charge > self.budget_bytes:
            return False
        self.delete(entry.key)
        while self._entries and self.bytes_used + charge > self.budget_bytes:
            _, old = self._entries.popitem(last=False)  # evict least recently used
            self.bytes_used -= old.charge
        self._entries[entry.key] = entry
        self.bytes_used += charge
        return True

    def delete(self, key: str) -> bool:
        old = self._entries.pop(key, None)
        if old is None:
            return False
        self.bytes_used -= old.charge
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes_used = 0
