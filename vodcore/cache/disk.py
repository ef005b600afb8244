"""The disk cache backend: one body file plus one metadata file per entry; survives restarts.

Layout: `root/ab/cd/<hash>-<token>.body` and `.meta`, where `<hash>` is blake2b-128 of the key
(`ab`, `cd` its first hex digits: 65,536 directories keep each one small) and `<token>` is random
per stored version, so a path never changes content: a reader holding `body_path` gets exactly
the body its metadata describes, or no file at all.

Rules:
- Crash safety: the body is written to a hidden temp file, fsynced and renamed first; then the
  metadata (orjson) the same way. The metadata's rename is the commit point, and `open()`
  accepts an entry only if its metadata parses, names the key that hashes to its file name, and
  its body exists with exactly the recorded size. Everything else is debris and is removed:
  temp files, bodies without metadata, metadata without (or with a short) body, and the older of
  two versions of one key (a crash between writing a replacement and unlinking the old one).
  The directory is not fsynced after the renames: a lost rename loses the entry, never makes it
  inconsistent, and `open()` cleans what is left.
- Serving while deleting: eviction and deletion unlink files that a response may be sending by
  sendfile at that moment. This relies on POSIX semantics (Linux): an unlinked file stays
  readable through descriptors already open, and its blocks are freed on the last close. A
  reader that has not opened the path yet gets FileNotFoundError and must treat it as a miss.
- The index (key -> entry) and the policy live in memory; every blocking call runs in a worker
  thread (`asyncio.to_thread`), one call per operation. Writes in flight are tracked by a token
  per key: a put whose key was deleted, evicted or replaced while it wrote removes its own files
  instead of committing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from vodcore.cache.admission import EvictionPolicy
from vodcore.cache.policy import AgeInputs
from vodcore.cache.storage import CachedResponse, IndexedStorage, default_policy

log = logging.getLogger("vod.cache.disk")

FORMAT_VERSION = 1
BODY, META, TMP_PREFIX = ".body", ".meta", ".tmp-"


def key_hash(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class OpenReport:
    """What `open()` found on disk."""

    entries: int
    removed_files: int  # debris cleaned up
    evicted: int  # valid entries dropped because the budget (or max object size) shrank


def _encode_meta(e: CachedResponse) -> bytes:
    return orjson.dumps(
        {
            "v": FORMAT_VERSION,
            "key": e.key,
            "status": e.status,
            "headers": [list(h) for h in e.headers],
            "age": {
                "age_value": e.age.age_value,
                "date_value": e.age.date_value,
                "request_time": e.age.request_time,
                "response_time": e.age.response_time,
            },
            "lifetime": e.lifetime,
            "etag": e.etag,
            "last_modified": e.last_modified,
            "size": e.size,
        }
    )


def _decode_meta(raw: bytes, body_path: Path) -> CachedResponse:
    """An entry from metadata bytes; ValueError/KeyError/TypeError if malformed."""
    d: Any = orjson.loads(raw)
    if d["v"] != FORMAT_VERSION:
        raise ValueError(f"format {d['v']}")
    a = d["age"]
    return CachedResponse(
        key=str(d["key"]),
        status=int(d["status"]),
        headers=tuple((str(k), str(v)) for k, v in d["headers"]),
        body=None,
        age=AgeInputs(
            age_value=float(a["age_value"]),
            date_value=None if a["date_value"] is None else float(a["date_value"]),
            request_time=float(a["request_time"]),
            response_time=float(a["response_time"]),
        ),
        lifetime=None if d["lifetime"] is None else float(d["lifetime"]),
        etag=None if d["etag"] is None else str(d["etag"]),
        last_modified=None if d["last_modified"] is None else float(d["last_modified"]),
        size=int(d["size"]),
        body_path=body_path,
    )


def _write_atomic(dst: Path, data: bytes, fsync: bool) -> None:
    """Temp file in dst's directory, fsync, rename: readers see no file or the whole file."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unlink_all(paths: list[Path]) -> None:
    """Best effort: a file that cannot be removed now is debris for the next `open()`."""
    for p in paths:
        try:
            p.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as e:
            log.warning("disk cache: cannot remove %s: %r", p, e)


def _meta_of(body_path: Path) -> Path:
    return body_path.with_suffix(META)


class DiskStorage(IndexedStorage):
    """Whole responses as files under `root`, bounded by `budget_bytes` (see module rules)."""

    def __init__(
        self,
        root: Path,
        budget_bytes: int,
        max_object_bytes: int,
        admission: EvictionPolicy | None = None,
        *,
        fsync: bool = True,
    ) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.max_object_bytes = max_object_bytes
        self.policy = default_policy(budget_bytes, admission)
        self.fsync = fsync
        self.last_open: OpenReport | None = None
        self._index: dict[str, CachedResponse] = {}
        self._pending: dict[str, str] = {}  # key -> token of the put writing it now
        self._tasks: set[asyncio.Task[bool]] = set()

    # Paths -----------------------------------------------------------------------------------
    def _body_path(self, key: str, token: str) -> Path:
        h = key_hash(key)
        return self.root / h[:2] / h[2:4] / f"{h}-{token}{BODY}"

    @staticmethod
    def _files(entry: CachedResponse) -> list[Path]:
        assert entry.body_path is not None
        return [_meta_of(entry.body_path), entry.body_path]  # metadata first: uncommit, then

    # Changes ---------------------------------------------------------------------------------
    def _forget(self, key: str) -> list[Path]:
        """Drop `key` from index, writes in flight and policy; the files to unlink."""
        self._pending.pop(key, None)
        self.policy.remove(key)
        old = self._index.pop(key, None)
        return self._files(old) if old is not None else []

    def _drop_evicted(self, keys: list[str], keep: str | None = None) -> list[Path]:
        paths: list[Path] = []
        for k in keys:
            if k == keep:
                continue
            self._pending.pop(k, None)
            old = self._index.pop(k, None)
            if old is not None:
                paths += self._files(old)
        return paths

    async def put(self, entry: CachedResponse) -> bool:
        body = entry.body
        if body is None:
            raise ValueError("DiskStorage.put needs the body bytes")
        key = entry.key
        stale = self._forget(key)
        if entry.size > self.max_object_bytes or entry.charge > self.budget_bytes:
            if stale:
                await asyncio.to_thread(_unlink_all, stale)
            return False
        evicted = self.policy.insert(key, entry.charge)
        stale += self._drop_evicted(evicted, keep=key)
        if key in evicted:
            if stale:
                await asyncio.to_thread(_unlink_all, stale)
            return False
        token = secrets.token_hex(6)
        self._pending[key] = token
        stored = CachedResponse(
            key=key,
            status=entry.status,
            headers=entry.headers,
            body=None,
            age=entry.age,
            lifetime=entry.lifetime,
            etag=entry.etag,
            last_modified=entry.last_modified,
            size=entry.size,
            body_path=self._body_path(key, token),
        )
        # Shielded: a requester going away must not leave a half-done put (the write finishes
        # in its thread either way; the commit below must run to account for it).
        task = asyncio.create_task(self._write_commit(stored, body, token, stale))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _write_sync(self, stored: CachedResponse, body: bytes, stale: list[Path]) -> None:
        assert stored.body_path is not None
        stored.body_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(stored.body_path, body, self.fsync)  # body first ...
        _write_atomic(_meta_of(stored.body_path), _encode_meta(stored), self.fsync)  # ... commit
        _unlink_all(stale)

    async def _write_commit(
        self, stored: CachedResponse, body: bytes, token: str, stale: list[Path]
    ) -> bool:
        key = stored.key
        try:
            await asyncio.to_thread(self._write_sync, stored, body, stale)
        except OSError as e:
            log.warning("disk cache: storing %r failed: %r", key, e)
            if self._pending.get(key) == token:
                del self._pending[key]
                self.policy.remove(key)
            await asyncio.to_thread(_unlink_all, self._files(stored) + stale)
            return False
        if self._pending.get(key) != token:
            # Deleted, evicted or replaced while we wrote: this version must not appear.
            await asyncio.to_thread(_unlink_all, self._files(stored))
            return False
        del self._pending[key]
        self._index[key] = stored
        return True

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
        if old is None or old.body_path is None:
            return None
        new = old.refreshed(
            headers=headers, age=age, lifetime=lifetime, etag=etag, last_modified=last_modified
        )
        meta = _meta_of(old.body_path)
        try:
            await asyncio.to_thread(_write_atomic, meta, _encode_meta(new), self.fsync)
        except OSError as e:
            log.warning("disk cache: refreshing %r failed: %r", key, e)
            return None
        current = self._index.get(key)
        if current is None or current.body_path != old.body_path:
            # Evicted or replaced meanwhile: our rename may have resurrected its metadata.
            await asyncio.to_thread(_unlink_all, [meta])
            return None
        self._index[key] = new
        gone = self.policy.resize(key, new.charge)
        stale = self._drop_evicted(gone)
        if stale:
            await asyncio.to_thread(_unlink_all, stale)
        return self._index.get(key)

    async def delete(self, key: str) -> bool:
        had = key in self._index or key in self._pending
        stale = self._forget(key)
        if stale:
            await asyncio.to_thread(_unlink_all, stale)
        return had

    async def clear(self) -> None:
        stale = [p for e in self._index.values() for p in self._files(e)]
        self._index.clear()
        self._pending.clear()  # writes in flight see their token gone and remove their files
        self.policy.clear()
        await asyncio.to_thread(_unlink_all, stale)

    # Lifecycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Rebuild the index from the files under `root`, removing debris (module rules)."""
        found, removed = await asyncio.to_thread(self._scan_sync)
        self._index.clear()
        self._pending.clear()
        self.policy.clear()
        stale: list[Path] = []
        # Oldest first, so that if the budget shrank the policy drops the oldest.
        for entry in sorted(found, key=lambda e: e.age.response_time):
            if entry.size > self.max_object_bytes:
                stale += self._files(entry)
                continue
            self._index[entry.key] = entry
            for k in self.policy.restore(entry.key, entry.charge):
                gone = self._index.pop(k, None)
                if gone is not None:
                    stale += self._files(gone)
        if stale:
            await asyncio.to_thread(_unlink_all, stale)
        self.last_open = OpenReport(len(self._index), removed, len(stale) // 2)
        log.info(
            "disk cache %s: %d entries, %d stray files removed, %d evicted",
            self.root,
            len(self._index),
            removed,
            len(stale) // 2,
        )

    def _scan_sync(self) -> tuple[list[CachedResponse], int]:
        self.root.mkdir(parents=True, exist_ok=True)
        best: dict[str, tuple[tuple[float, int], CachedResponse]] = {}
        junk: list[Path] = []
        for dirpath, _dirs, files in os.walk(self.root):
            here = Path(dirpath)
            bodies = {f for f in files if f.endswith(BODY) and not f.startswith(TMP_PREFIX)}
            claimed: set[str] = set()
            for name in files:
                path = here / name
                if name.startswith(TMP_PREFIX):
                    junk.append(path)  # a write interrupted before its rename
                    continue
                if not name.endswith(META):
                    continue
                body_name = name[: -len(META)] + BODY
                entry = self._load(path, here / body_name, body_name in bodies)
                if entry is None:
                    junk.append(path)
                    continue
                claimed.add(body_name)
                rank = (entry.age.response_time, path.stat().st_mtime_ns)
                prev = best.get(entry.key)
                if prev is None or rank > prev[0]:
                    if prev is not None:
                        junk += self._files(prev[1])  # an older version of the same key
                    best[entry.key] = (rank, entry)
                else:
                    junk += self._files(entry)
            junk += [here / b for b in bodies - claimed]  # bodies whose metadata never landed
        _unlink_all(junk)
        return [e for _, e in best.values()], len(junk)

    @staticmethod
    def _load(meta: Path, body: Path, body_exists: bool) -> CachedResponse | None:
        if not body_exists:
            return None
        try:
            entry = _decode_meta(meta.read_bytes(), body)
            size = body.stat().st_size
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("disk cache: dropping %s: %r", meta, e)
            return None
        if size != entry.size or not meta.name.startswith(key_hash(entry.key) + "-"):
            return None
        return entry

    async def close(self) -> None:
        """Let writes in flight finish (they are shielded from their requesters)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
