"""Expiry of unfinished uploads (tus 1.0.0 §7.3 Expiration): a background sweep that removes
open upload sessions past their `Upload-Expires`, with their partial data.

Rules:
- Until the sweep reaches it, an expired open session is answered 410 Gone by HEAD, PATCH and
  DELETE (`Uploads.session`); a PATCH's offset compare-and-set also refuses an expired session,
  so no byte lands after the deadline. Once swept it is 404 (tus §7.3: 404 or 410).
- A pass removes at most `batch` expired sessions, oldest deadline first, each through
  `uploads.abandon` (one transaction: CAS delete of the open, expired row; the video if still
  UPLOADING; an `upload.expired` event; then the files). A session completed or terminated
  meanwhile is left alone, and two sweepers (two control processes) never both remove one
  session, so a pass is idempotent.
- The same pass looks at up to `orphan_limit` session files untouched for `orphan_grace`
  seconds and deletes the orphans among them:
  any file of a session that is gone or complete (a crash between the row delete and the file
  delete, a completion cut short), and the completion-link files of an open session
  (a completion that died). The live files of an open session are kept.
- `run_expiry` repeats a pass every `interval` seconds until `stop` is set; an error in a pass
  (database away) is logged and the next pass tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from control.upload_files import SESSION_FILE
from control.uploads import OPEN, abandon
from vodcore.config import Settings
from vodcore.db.schema import upload_sessions

log = logging.getLogger("vod.uploads")

DEFAULT_INTERVAL = 60.0
DEFAULT_BATCH = 100
DEFAULT_ORPHAN_GRACE = 3600.0
DEFAULT_ORPHAN_LIMIT = 1000
_IN_CHUNK = 200  # ids per IN (…) query


@dataclass(frozen=True, slots=True)
class Swept:
    expired: int
    orphan_files: int


async def expire_once(
    engine: AsyncEngine,
    uploads_dir: Path,
    now: float,
    *,
    batch: int = DEFAULT_BATCH,
    orphan_grace: float = DEFAULT_ORPHAN_GRACE,
    orphan_limit: int = DEFAULT_ORPHAN_LIMIT,
) -> Swept:
    """One bounded pass: expired sessions first, then orphan files."""
    async with engine.connect() as conn:
        ids = (
            (
                await conn.execute(
                    select(upload_sessions.c.id)
                    .where(upload_sessions.c.status == OPEN, upload_sessions.c.expires_at <= now)
                    .order_by(upload_sessions.c.expires_at)
                    .limit(batch)
                )
            )
            .scalars()
            .all()
        )
    expired = 0
    for sid in ids:
        if await abandon(engine, uploads_dir, str(sid), "expired", now, expired_only=True):
            expired += 1
    orphans = await _sweep_orphans(engine, uploads_dir, now - orphan_grace, orphan_limit)
    if expired or orphans:
        log.info("upload expiry: %d sessions expired, %d orphan files removed", expired, orphans)
    return Swept(expired, orphans)


async def run_expiry(
    engine: AsyncEngine,
    settings: Settings,
    stop: asyncio.Event,
    *,
    interval: float = DEFAULT_INTERVAL,
    batch: int = DEFAULT_BATCH,
    orphan_grace: float = DEFAULT_ORPHAN_GRACE,
) -> None:
    """The background task: a pass, then wait `interval` (or until `stop`), until `stop`."""
    while not stop.is_set():
        try:
            await expire_once(
                engine, settings.uploads_dir, time.time(), batch=batch, orphan_grace=orphan_grace
            )
        except Exception:
            log.exception("upload expiry pass failed; retrying in %.0f s", interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def _old_files(uploads_dir: Path, horizon: float, limit: int) -> dict[str, list[Path]]:
    """Session files not modified since `horizon`, grouped by session id (at most `limit`)."""
    out: dict[str, list[Path]] = {}
    n = 0
    try:
        it = os.scandir(uploads_dir)
    except FileNotFoundError:
        return out
    with it:
        for entry in it:
            m = SESSION_FILE.match(entry.name)
            if m is None:
                continue
            try:
                if entry.stat().st_mtime >= horizon:
                    continue
            except FileNotFoundError:
                continue
            out.setdefault(m.group(1), []).append(Path(entry.path))
            n += 1
            if n >= limit:
                break
    return out


def _unlink(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


async def _sweep_orphans(engine: AsyncEngine, uploads_dir: Path, horizon: float, limit: int) -> int:
    groups = await asyncio.to_thread(_old_files, uploads_dir, horizon, limit)
    if not groups:
        return 0
    sids = list(groups)
    status: dict[str, str] = {}
    async with engine.connect() as conn:
        for i in range(0, len(sids), _IN_CHUNK):
            rows = await conn.execute(
                select(upload_sessions.c.id, upload_sessions.c.status).where(
                    upload_sessions.c.id.in_(sids[i : i + _IN_CHUNK])
                )
            )
            status.update({str(r.id): str(r.status) for r in rows})
    doomed: list[Path] = []
    for sid, paths in groups.items():
        if status.get(sid) == OPEN:
            # keep the data of a live upload; drop what a dead PATCH or completion left
            doomed += [p for p in paths if p.suffix == ".final"]
        else:
            doomed += paths
    return await asyncio.to_thread(_unlink, doomed)
