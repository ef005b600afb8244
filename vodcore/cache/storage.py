"""Where the cache keeps whole responses: the core interface and the memory backend.

Rules:
- An entry is a whole 200 response: status, the end-to-end headers worth replaying, the body,
  and what RFC 9111 §4.2.3 needs to compute its age. Partial (206) bodies are never stored.
  A memory entry carries `body` (bytes); a disk entry carries `body_path` (a file holding
  exactly the body, for sendfile) and `body=None`. `size` is the body's length either way.
- A backend is bounded in bytes (`charge`: body plus a header estimate). An entry larger than
  `max_object_bytes` or than the whole budget is refused (`put` returns False) and the caller
  passes it through. Which entries stay is the admission/eviction policy's decision
  (`vodcore.cache.admission`, W-TinyLFU by default): `put` may also return False because the
  policy did not admit the entry, and may evict others.
- `get` is synchronous (an index lookup) and is the one place a request is counted for the
  policy, hit or miss; `put` after a miss's fill does not count again.
- Backends: `MemoryStorage` here, `DiskStorage` (`disk.py`), `TieredStorage` (`tiered.py`).
  Backends do no blocking I/O on the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, KeysView
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vodcore.cache.admission import EvictionPolicy, WTinyLFU
from vodcore.cache.policy import AgeInputs

ENTRY_OVERHEAD = 256  # bookkeeping per entry, so many tiny objects still count against the budget


@dataclass(frozen=True, slots=True)
class CachedResponse:
    key: str
    status: int
    headers: tuple[tuple[str, str], ...]  # end-to-end fields, original case, no Date/Age
    body: bytes | None  # None for a disk entry: read `body_path`
    age: AgeInputs
    lifetime: float | None  # freshness lifetime (RFC 9111 §4.2.1) fixed when stored
    etag: str | None
    last_modified: float | None
    size: int = 0  # body length in bytes; filled in from `body` when left 0
    body_path: Path | None = None  # disk entries: the file holding exactly the body

    def __post_init__(self) -> None:
        if self.body is not None and self.size != len(self.body):
            if self.size:
                raise ValueError(f"size {self.size} != body length {len(self.body)}")
            object.__setattr__(self, "size", len(self.body))  # frozen: set once, here

    @property
    def stored_at(self) -> float:
        return self.age.response_time

    @property
    def charge(self) -> int:
        """Bytes this entry counts against the budget."""
        return (
            self.size
            + sum(len(k) + len(v) + 4 for k, v in self.headers)
            + len(self.key)
            + ENTRY_OVERHEAD
        )

    def refreshed(
        self,
        *,
        headers: tuple[tuple[str, str], ...],
        age: AgeInputs,
        lifetime: float | None,
        etag: str | None,
        last_modified: float | None,
    ) -> CachedResponse:
        """This entry with metadata from a 304 (RFC 9111 §4.3.4); body untouched."""
        return dataclasses.replace(
            self,
            headers=headers,
            age=age,
            lifetime=lifetime,
            etag=etag,
            last_modified=last_modified,
        )


class CacheStorage(Protocol):
    """The core every cache backend implements."""

    @property
    def bytes_used(self) -> int:
        """What the entries charge against the budget now."""
        ...

    def __len__(self) -> int: ...

    def get(self, key: str) -> CachedResponse | None:
        """Index lookup; records the request with the admission policy (hit or miss)."""
        ...

    def peek(self, key: str) -> CachedResponse | None:
        """Look up without counting a request (purges, bookkeeping)."""
        ...

    async def put(self, entry: CachedResponse) -> bool:
        """Store `entry` (with `body` bytes), replacing any entry under its key. False if
        refused: too big, or not admitted by the policy."""
        ...

    async def update(
        self,
        key: str,
        *,
        headers: tuple[tuple[str, str], ...],
        age: AgeInputs,
        lifetime: float | None,
        etag: str | None,
        last_modified: float | None,
    ) -> CachedResponse | None:
        """Refresh the stored metadata after a 304 (RFC 9111 §4.3.4), body untouched; the new
        entry, or None if `key` is not stored."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def clear(self) -> None: ...

    def keys(self) -> Iterator[str]:
        """A snapshot of the stored keys (safe to mutate the storage while iterating)."""
        ...

    async def open(self) -> None:
        """Make the storage ready (disk: rebuild the index from the files)."""
        ...

    async def close(self) -> None: ...


def default_policy(budget_bytes: int, admission: EvictionPolicy | None) -> EvictionPolicy:
    if admission is None:
        return WTinyLFU(budget_bytes)
    if admission.budget_bytes != budget_bytes:
        raise ValueError(
            f"admission policy budget {admission.budget_bytes} != storage budget {budget_bytes}"
        )
    return admission


class IndexedStorage:
    """The reads every backend shares: an in-memory index of entries and an admission policy
    that counts each request (`get`) but not a look that is not one (`peek`)."""

    _index: dict[str, CachedResponse]
    policy: EvictionPolicy

    @property
    def bytes_used(self) -> int:
        return self.policy.bytes_used  # includes disk writes in flight: their room is reserved

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def get(self, key: str) -> CachedResponse | None:
        self.policy.access(key)
        return self._index.get(key)

    def peek(self, key: str) -> CachedResponse | None:
        """Look up without counting a request."""
        return self._index.get(key)

    def keys(self) -> Iterator[str]:
        """A snapshot of the stored keys (safe to delete while iterating)."""
        return iter(list(self._index))

    def keys_view(self) -> KeysView[str]:
        """A live view of the stored keys (set operations; do not mutate while iterating)."""
        return self._index.keys()


class MemoryStorage(IndexedStorage):
    """Whole responses in a dict; the admission policy decides what stays within the budget."""

    def __init__(
        self,
        budget_bytes: int,
        max_object_bytes: int,
        admission: EvictionPolicy | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.max_object_bytes = max_object_bytes
        self.policy = default_policy(budget_bytes, admission)
        self._index: dict[str, CachedResponse] = {}

    async def put(self, entry: CachedResponse) -> bool:
        return self.put_nowait(entry)

    def put_nowait(self, entry: CachedResponse) -> bool:
        if entry.body is None:
            raise ValueError("MemoryStorage.put needs the body bytes")
        charge = entry.charge
        self._drop(entry.key)
        if entry.size > self.max_object_bytes or charge > self.budget_bytes:
            return False
        if entry.body_path is not None:
            entry = dataclasses.replace(entry, body_path=None)
        admitted = True
        for k in self.policy.insert(entry.key, charge):
            if k == entry.key:
                admitted = False
            else:
                self._index.pop(k, None)
        if admitted:
            self._index[entry.key] = entry
        return admitted

    async def update(
        self,
        key: str,
        *,
        headers: tuple[tuple[str, str], ...],
        age: AgeInputs,
        lifetime: float | None,
        etag: str | None,
        last_modified: float | None,
    ) -> CachedResponse | None:
        old = self._index.get(key)
        if old is None:
            return None
        new = old.refreshed(
            headers=headers, age=age, lifetime=lifetime, etag=etag, last_modified=last_modified
        )
        self._index[key] = new
        for k in self.policy.resize(key, new.charge):
            self._index.pop(k, None)
        return self._index.get(key)

    def _drop(self, key: str) -> bool:
        self.policy.remove(key)
        return self._index.pop(key, None) is not None

    async def delete(self, key: str) -> bool:
        return self._drop(key)

    async def clear(self) -> None:
        self._index.clear()
        self.policy.clear()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass
