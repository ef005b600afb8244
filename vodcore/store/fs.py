"""Filesystem object store: one file per object under a root directory.

Blocking filesystem calls run in the default executor, one call per operation (aiohttp's
web_fileresponse does the same). Writes go to a hidden temporary file in the target directory,
are fsynced, then renamed, so readers see either no object or the whole object.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from vodcore.paths import split_key
from vodcore.store import ObjectInfo, ObjectNotFound


def _etag(st: os.stat_result) -> str:
    # size + mtime_ns + inode: changes whenever the file is replaced (objects are immutable,
    # so a replacement is the only way the bytes change).
    raw = f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}".encode()
    return '"' + hashlib.blake2b(raw, digest_size=12).hexdigest() + '"'


def _atomic_write(dst: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write through a hidden temporary file in dst's directory, fsync, then rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst.parent)
    # mkstemp makes 0600 files: stored objects are readable like any other media (0644), so
    # an origin running as another user serves them and quality.json is not the odd one out.
    os.fchmod(fd, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FilesystemStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*split_key(key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def _stat_sync(self, key: str) -> ObjectInfo:
        p = self._path(key)
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        if not p.is_file():
            raise ObjectNotFound(key)
        return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime, etag=_etag(st))

    async def stat(self, key: str) -> ObjectInfo:
        return await asyncio.to_thread(self._stat_sync, key)

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except ObjectNotFound:
            return False
        return True

    async def open_range(
        self, key: str, start: int = 0, length: int | None = None, chunk: int = 256 * 1024
    ) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        try:
            await asyncio.to_thread(f.seek, start)
            remaining = length
            while remaining is None or remaining > 0:
                n = chunk if remaining is None else min(chunk, remaining)
                data = await asyncio.to_thread(f.read, n)
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data
        finally:
            f.close()

    def _put_file_sync(self, key: str, src: Path, move: bool) -> ObjectInfo:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                os.replace(src, dst)  # same filesystem: atomic rename
                return self._stat_sync(key)
            except OSError:
                pass
        with open(src, "rb") as inp:
            _atomic_write(dst, lambda out: shutil.copyfileobj(inp, out, 1024 * 1024))
        if move:
            Path(src).unlink(missing_ok=True)
        return self._stat_sync(key)

    async def put_file(self, key: str, src: Path, *, move: bool = False) -> ObjectInfo:
        return await asyncio.to_thread(self._put_file_sync, key, Path(src), move)

    def _put_bytes_sync(self, key: str, data: bytes) -> ObjectInfo:
        _atomic_write(self._path(key), lambda out: out.write(data))
        return self._stat_sync(key)

    async def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return await asyncio.to_thread(self._put_bytes_sync, key, data)

    def _list_sync(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith(".tmp-"):
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    async def list(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list_sync, prefix)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(lambda: self._path(key).unlink(missing_ok=True))

    def _move_sync(self, src_key: str, dst_key: str) -> None:
        src, dst = self._path(src_key), self._path(dst_key)
        if not src.is_file():
            raise ObjectNotFound(src_key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dst)  # one rename: atomic; inode, mtime and so the ETag are kept
        except FileNotFoundError:
            raise ObjectNotFound(src_key) from None

    async def move(self, src_key: str, dst_key: str) -> None:
        await asyncio.to_thread(self._move_sync, src_key, dst_key)
