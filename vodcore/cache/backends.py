"""Which storage a caching tier gets from its settings.

Memory only, or memory over disk when `settings.disk_cache_bytes[tier]` > 0. The disk tier
lives in DATA/cache/{tier} and is owned by one process at a time: it takes an exclusive
`flock` on a lock file there. Several processes of one tier (SO_REUSEPORT workers) share a
data directory; the first gets the disk tier, the others run memory only and say so, rather
than two indexes fighting over one directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from vodcore.cache.disk import DiskStorage
from vodcore.cache.storage import CacheStorage, MemoryStorage
from vodcore.cache.tiered import TieredStorage
from vodcore.config import Settings

log = logging.getLogger("vod.cache")

# Objects at least this large are served from the disk tier by sendfile, not from memory.
SENDFILE_MIN_BYTES = 256 * 1024


def _lock_dir(path: Path) -> int | None:
    """An exclusive lock on `path/.lock` (released by closing the fd), or None if taken."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class LockedTieredStorage(TieredStorage):
    """Memory over disk, holding the disk directory's lock until closed."""

    def __init__(self, memory: MemoryStorage, disk: DiskStorage, lock_fd: int) -> None:
        super().__init__(memory, disk, memory_max_object_bytes=SENDFILE_MIN_BYTES)
        self._lock_fd: int | None = lock_fd

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None


def build_storage(settings: Settings, tier: str) -> CacheStorage:
    memory = MemoryStorage(settings.cache_bytes.get(tier, 0), settings.max_object_bytes)
    disk_bytes = settings.disk_cache_bytes.get(tier, 0)
    if disk_bytes <= 0:
        return memory
    root = settings.data_dir / "cache" / tier
    lock_fd = _lock_dir(root)
    if lock_fd is None:
        log.warning("%s: %s is in use by another process; this one caches in memory only",
                    tier, root)  # fmt: skip
        return memory
    disk = DiskStorage(root / "objects", disk_bytes, settings.max_object_bytes)
    return LockedTieredStorage(memory, disk, lock_fd)
