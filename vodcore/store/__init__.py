"""The object-store interface every tier and the transcoder write and read through.

A small core (tusd's DataStore is the model): `stat`, `open_range`, `put_file`, `put_bytes`,
`exists`, `list`, `delete`, `move`. Keys are validated by `vodcore.paths.check_key`. A backend
declares optional capabilities: `local_path` (the filesystem store can hand out a path so the
origin can sendfile). One module per backend: `fs.py` now, `s3.py` later.

Writes are atomic: an object is either absent or whole (written to a temporary name, then
renamed), never half-written. `move` (takedowns move a video's objects to a restricted prefix
and back) never leaves an object half-written or lost: on the filesystem it is one rename; on
S3 it is a copy then a delete, so a crash between the two leaves the object under both keys, and
running the move again finishes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


class ObjectNotFound(KeyError):
    pass


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch
    etag: str  # strong validator, quoted per RFC 9110 §8.8.3


@runtime_checkable
class ObjectStore(Protocol):
    async def stat(self, key: str) -> ObjectInfo:
        """Metadata of one object; raises ObjectNotFound."""

    async def exists(self, key: str) -> bool: ...

    def open_range(
        self, key: str, start: int = 0, length: int | None = None, chunk: int = 256 * 1024
    ) -> AsyncIterator[bytes]:
        """Stream bytes [start, start+length) of an object."""

    async def put_file(self, key: str, src: Path, *, move: bool = False) -> ObjectInfo:
        """Store a local file under key atomically; `move` lets a same-disk backend rename."""

    async def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    async def list(self, prefix: str) -> list[str]:
        """Keys under a prefix (which ends with '/')."""

    async def delete(self, key: str) -> None: ...

    async def move(self, src_key: str, dst_key: str) -> None:
        """Move an object to another key (replacing what is there); afterwards `src_key` is
        gone. Raises ObjectNotFound if `src_key` does not exist."""

    def local_path(self, key: str) -> Path | None:
        """Capability: a path on this machine for sendfile, or None."""
