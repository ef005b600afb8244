"""The object-store interface every tier and the transcoder write and read through.

A small core (tusd's DataStore is the model): `stat`, `open_range`, `put_file`, `put_bytes`,
`exists`, `list`, `delete`, `move`. Keys are validated by `vodcore.paths.check_key`. A backend
declares optional capabilities: `local_path` (the filesystem store can hand out a path so the
origin can sendfile), and `MultipartStore` (S3: multipart uploads a client can write to directly
through presigned part URLs, or the control plane part by part; see `control/multipart.py`).
One module per backend: `fs.py`, `s3.py`.

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


class MultipartError(Exception):
    """A multipart call the backend refused: `code` is the backend's error code (S3's
    `InvalidPart`, `InvalidPartOrder`, `EntityTooSmall`, `NoSuchUpload`, …)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class PartInfo:
    number: int
    etag: str  # quoted, as the backend returns it
    size: int


@runtime_checkable
class MultipartStore(Protocol):
    """Capability: multipart uploads (S3's API). An object appears only when `complete_multipart`
    succeeds; `abort_multipart` frees the parts (and is harmless on an unknown upload)."""

    async def create_multipart(self, key: str) -> str:
        """Start a multipart upload of `key`; returns its upload id."""

    async def presign_part(self, key: str, upload_id: str, number: int, expires_in: int) -> str:
        """A URL a client can PUT part `number` to (no credentials), valid `expires_in` s."""

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """Upload one part; returns its ETag (quoted)."""

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        """The parts stored so far, by number; raises MultipartError("NoSuchUpload")."""

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> ObjectInfo:
        """Assemble (number, etag) parts into the object; raises MultipartError."""

    async def abort_multipart(self, key: str, upload_id: str) -> None: ...
