"""Memory in front of disk, behind the same `CacheStorage` interface.

Rules:
- `get` looks in memory, then on disk. Both tiers count the request with their own policy, so
  an object that keeps being asked for earns its way into memory too.
- A disk hit of an object no larger than `promote_max_bytes` is copied into memory by a
  background task (one per key at a time) that reads the file off the event loop; the disk
  entry is returned meanwhile. The copy is offered to memory's policy, which may refuse it.
- `put` writes to both tiers (inclusive: disk is the durable copy); each tier admits or refuses
  on its own. `update`, `delete` and `clear` apply to both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Iterator

from vodcore.cache.disk import DiskStorage
from vodcore.cache.policy import AgeInputs
from vodcore.cache.storage import CachedResponse, MemoryStorage

log = logging.getLogger("vod.cache.tiered")

DEFAULT_PROMOTE_MAX_BYTES = 2 * 1024 * 1024


class TieredStorage:
    def __init__(
        self,
        memory: MemoryStorage,
        disk: DiskStorage,
        *,
        promote_max_bytes: int = DEFAULT_PROMOTE_MAX_BYTES,
        memory_max_object_bytes: int | None = None,
    ) -> None:
        self.memory = memory
        self.disk = disk
        # Large objects are kept on disk only: sent by sendfile from the page cache they cost
        # less CPU than copying a bytes object into the socket (bench/RESULTS.md), and the
        # memory budget goes to the many small objects (manifests, init segments).
        self.memory_max_object_bytes = (
            memory.max_object_bytes
            if memory_max_object_bytes is None
            else min(memory_max_object_bytes, memory.max_object_bytes)
        )
        self.promote_max_bytes = min(promote_max_bytes, self.memory_max_object_bytes)
        self._promoting: dict[str, asyncio.Task[None]] = {}

    @property
    def bytes_used(self) -> int:
        return self.memory.bytes_used + self.disk.bytes_used

    @property
    def memory_bytes(self) -> int:
        return self.memory.bytes_used

    @property
    def disk_bytes(self) -> int:
        return self.disk.bytes_used

    def __len__(self) -> int:
        """Distinct keys across both tiers."""
        return len(self.disk) + len(self.memory.keys_view() - self.disk.keys_view())

    def __contains__(self, key: object) -> bool:
        return key in self.memory or key in self.disk

    def peek(self, key: str) -> CachedResponse | None:
        """Look up without counting a request."""
        return self.memory.peek(key) or self.disk.peek(key)

    def keys(self) -> Iterator[str]:
        return iter(list(self.disk.keys_view() | self.memory.keys_view()))

    def get(self, key: str) -> CachedResponse | None:
        hit = self.memory.get(key)
        if hit is not None:
            return hit
        hit = self.disk.get(key)
        if hit is not None and hit.size <= self.promote_max_bytes:
            self._promote(hit)
        return hit

    def _promote(self, entry: CachedResponse) -> None:
        if entry.key in self._promoting:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._promote_task(entry))
        except RuntimeError:  # no event loop (a synchronous caller): skip the copy
            return
        self._promoting[entry.key] = task
        task.add_done_callback(functools.partial(self._promoted, entry.key))

    def _promoted(self, key: str, task: asyncio.Task[None]) -> None:
        if self._promoting.get(key) is task:
            del self._promoting[key]

    async def _promote_task(self, entry: CachedResponse) -> None:
        assert entry.body_path is not None
        try:
            body = await asyncio.to_thread(entry.body_path.read_bytes)
        except OSError:
            return  # evicted meanwhile: nothing to copy
        current = self.disk.peek(entry.key)
        if current is None or current.body_path != entry.body_path or len(body) != entry.size:
            return  # replaced or gone while we read
        self.memory.put_nowait(dataclasses.replace(current, body=body, body_path=None))

    async def put(self, entry: CachedResponse) -> bool:
        in_memory = entry.size <= self.memory_max_object_bytes and self.memory.put_nowait(entry)
        on_disk = await self.disk.put(entry)
        return in_memory or on_disk

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
        m = await self.memory.update(
            key, headers=headers, age=age, lifetime=lifetime, etag=etag, last_modified=last_modified
        )
        d = await self.disk.update(
            key, headers=headers, age=age, lifetime=lifetime, etag=etag, last_modified=last_modified
        )
        return m if m is not None else d

    async def delete(self, key: str) -> bool:
        self._cancel_promotion(key)
        m = await self.memory.delete(key)
        d = await self.disk.delete(key)
        return m or d

    def _cancel_promotion(self, key: str) -> None:
        task = self._promoting.pop(key, None)
        if task is not None:
            task.cancel()

    async def clear(self) -> None:
        for key in list(self._promoting):
            self._cancel_promotion(key)
        await self.memory.clear()
        await self.disk.clear()

    async def open(self) -> None:
        await self.memory.open()
        await self.disk.open()

    async def close(self) -> None:
        tasks = list(self._promoting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.memory.close()
        await self.disk.close()
