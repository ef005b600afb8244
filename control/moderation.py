"""Takedowns (issue 4): block / unblock, delete / restore, recorded (who, when, why, the state
before). Operator role only.

- `POST /v1/videos/{id}/block {reason}`, in one transaction: the video moves to BLOCKED (the
  playback API then answers 451), its token revocation cutoff is set to now (tokens issued
  before it are void), the action is recorded (`moderation` row) and logged as an event, and a
  `block` entry is appended to the purge log. Every edge and shield applies that entry in
  order: cached objects of the video are dropped and edges refuse the video's older tokens;
  an origin following the log refuses the video's objects (451).
- `POST /v1/videos/{id}/unblock`: back to the state recorded before the block, recorded, and an
  `unblock` entry on the log (caches drop nothing; the origin serves the video again). The
  cutoff stays, so only tokens issued after the block (by the playback API) play again.
- `DELETE /v1/videos/{id} {reason}` (the reason may also come as `?reason=`): like a block, with
  state DELETED (410) and a `delete` entry (the origin answers 410); after the commit the
  video's `media/{id}/` objects are moved to `restricted/media/{id}/` (`vodcore.layout`), which
  no tier serves. `source/{id}/` is never touched. A second delete answers 409.
- `POST /v1/videos/{id}/restore {reason?}`: the objects are moved back to `media/{id}/` first,
  then, in one transaction, the state recorded before the delete comes back (a video deleted
  while blocked is blocked again), recorded, with a `restore` entry. 409 unless DELETED.

Crashes: the order is chosen so that an interrupted takedown never exposes anything. A delete
commits (refusals everywhere) before it moves; a restore moves before it commits. Either way the
objects can be left on both sides of the move, so every delete and restore, including one that
answers 409, first finishes the move its video's state calls for: it lists both prefixes and
moves whatever is still on the wrong side. Re-running the command after a crash therefore
completes it. Moves of one video are serialised in this process (a per-video lock); two control
processes moving the same video at once are not coordinated.

Each of the four forgets the video in the negative-lookup cache (`control.negcache`) of this
process and invalidates it in the metadata cache (`control.metacache`: this process's memory
and Redis), so this process never answers from a state it has just changed and other control
processes answer from the new one within the metadata cache's local TTL (1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control.auth import Principal, authenticate
from control.metacache import METACACHE_KEY, MetaCache
from control.negcache import NegativeCache
from control.purges import Purges
from control.validation import decode_json
from vodcore.db.schema import moderation, video_cutoffs, videos
from vodcore.db.videos import append_event, get_video
from vodcore.errors import NOT_FOUND, VALIDATION, VIDEO_STATE, ApiError
from vodcore.layout import media_prefix, restricted_key, restricted_prefix, unrestricted_key
from vodcore.lifecycle import Event, IllegalTransition, State, next_state
from vodcore.purge import RESTRICT, Purge
from vodcore.store import ObjectNotFound, ObjectStore

# what `?refusals=1` on /v1/cutoffs says of a taken-down video (origin.takedowns.Refusal)
_REFUSALS = {State.BLOCKED.value: "blocked", State.DELETED.value: "deleted"}

MOVES_AT_ONCE = 16  # concurrent object moves (S3: one copy and one delete request each)
MAX_REASON = 2000


def _reason(raw: bytes, query: str | None, *, required: bool) -> str | None:
    doc = decode_json(raw) if raw.strip() else {}
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be a JSON object")
    reason = doc.get("reason", query)
    if reason is None and not required:
        return None
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise ApiError(VALIDATION, "reason: a short text is required")
    return reason.strip()


async def set_cutoff(conn: AsyncConnection, vid: str, now: float) -> None:
    """The video's token revocation cutoff (tokens issued before `now` are void), in the
    caller's transaction: takedowns, and `PATCH` to a more restricted visibility."""
    res = await conn.execute(
        update(video_cutoffs).where(video_cutoffs.c.video_id == vid).values(cutoff=now)
    )
    if res.rowcount == 0:
        await conn.execute(video_cutoffs.insert().values(video_id=vid, cutoff=now))


async def restrict_tokens(
    purges: Purges, conn: AsyncConnection, vid: str, actor: str, now: float
) -> list[Purge]:
    """Void the video's tokens issued before `now` at every edge and drop its cached objects,
    for a video that stays playable (its owner gets new tokens): `set_cutoff`, then one
    `restrict` entry with the cutoff on the purge log (`vodcore.purge`: edges take the cutoff
    and caches drop the objects as for a block, but nothing refuses the video), in the
    caller's transaction (hold `purges._write`; call `purges.published` after the commit)."""
    await set_cutoff(conn, vid, now)
    cut = await purges.append(conn, "video", (vid,), False, actor, now, action=RESTRICT, cutoff=now)
    return [cut]


class Moderation:
    def __init__(
        self,
        purges: Purges,
        store: ObjectStore,
        negative: NegativeCache | None = None,
        meta: MetaCache | None = None,
    ) -> None:
        self.purges = purges
        self.engine = purges.engine
        self.store = store
        self.negative = negative if negative is not None else NegativeCache()
        self.meta = meta  # None: the app's (`METACACHE_KEY`, set by `Videos.routes`), if any
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/videos/{id}/block", self.block)
        app.router.add_post("/v1/videos/{id}/unblock", self.unblock)
        app.router.add_delete("/v1/videos/{id}", self.delete)
        app.router.add_post("/v1/videos/{id}/restore", self.restore)
        app.router.add_get("/v1/cutoffs", self.cutoffs)

    # --- shared steps --------------------------------------------------------------------------

    async def _forget(self, request: web.Request, vid: str) -> None:
        """After a committed change of the video's state: drop what the caches remember."""
        self.negative.forget(vid)
        meta = self.meta if self.meta is not None else request.app.get(METACACHE_KEY)
        if meta is not None:
            await meta.invalidate(vid)

    @contextlib.asynccontextmanager
    async def _exclusive(self, vid: str) -> AsyncIterator[None]:
        """One delete/restore of a video at a time in this process."""
        lock, users = self._locks.setdefault(vid, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._locks.pop(vid, None)

    async def _record(
        self,
        conn: AsyncConnection,
        vid: str,
        action: str,
        before: State,
        after: State,
        principal: Principal,
        reason: str | None,
        now: float,
    ) -> None:
        """The state change, its moderation row and its event, in the caller's transaction."""
        await conn.execute(
            update(videos).where(videos.c.id == vid).values(state=after.value, updated_at=now)
        )
        await conn.execute(
            moderation.insert().values(
                video_id=vid, action=action, reason=reason, actor=principal.key_id,
                previous_state=before.value, at=now,
            )
        )  # fmt: skip
        payload: dict[str, Any] = {"from": before.value, "to": after.value, "by": principal.key_id}
        if reason is not None:
            payload["reason"] = reason
        event = {"block": "blocked", "unblock": "unblocked", "delete": "deleted"}.get(action)
        await append_event(conn, f"video.{event or 'restored'}", vid, payload, now)

    async def _set_cutoff(self, conn: AsyncConnection, vid: str, now: float) -> None:
        await set_cutoff(conn, vid, now)

    async def _previous(self, conn: AsyncConnection, vid: str, action: str, now: State) -> State:
        """The state recorded by the video's last `action` (block/delete), READY if none."""
        last = (
            await conn.execute(
                select(moderation.c.previous_state)
                .where(moderation.c.video_id == vid, moderation.c.action == action)
                .order_by(moderation.c.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        return State(last) if last and last != now.value else State.READY

    async def _takedown(
        self, request: web.Request, action: str, event: Event, *, again: bool
    ) -> tuple[str, State, Purge]:
        """Block or delete: state, cutoff, record, event and log entry in one transaction.
        `again`: a video already in the target state is taken down again (a re-block moves
        the cutoff forward); else that is a 409."""
        principal = await authenticate(self.engine, request, roles=("operator",))
        reason = _reason(await request.read(), request.query.get("reason"), required=True)
        vid = request.match_info["id"]
        now = time.time()
        async with self.purges._write, self.engine.begin() as conn:
            v = await get_video(conn, vid)
            if v is None:
                raise ApiError(NOT_FOUND, "no such video")
            before = State(v["state"])
            try:
                state = next_state(before, event)
            except IllegalTransition as e:
                raise ApiError(VIDEO_STATE, str(e), extra={"state": before.value}) from None
            if before is state and not again:
                raise ApiError(
                    VIDEO_STATE, f"the video is already {state.value}", extra={"state": state.value}
                )
            await self._record(conn, vid, action, before, state, principal, reason, now)
            await self._set_cutoff(conn, vid, now)
            entry = await self.purges.append(
                conn, "video", (vid,), False, principal.key_id, now, action=action, cutoff=now
            )
        self.purges.published(entry)
        await self._forget(request, vid)
        return vid, state, entry

    async def _settle(self, vid: str, deleted: bool) -> int:
        """Move every object of the video that is on the wrong side for its state: to the
        restricted prefix when deleted, back to `media/` otherwise. Returns how many moved."""
        media = await self.store.list(media_prefix(vid))
        restricted = await self.store.list(restricted_prefix(vid))
        moves = (
            [(k, restricted_key(k)) for k in media]
            if deleted
            else [(k, unrestricted_key(k)) for k in restricted]
        )
        gate = asyncio.Semaphore(MOVES_AT_ONCE)

        async def move(src: str, dst: str) -> int:
            async with gate:
                try:
                    await self.store.move(src, dst)
                except ObjectNotFound:
                    return 0  # moved meanwhile (by another control process)
                return 1

        return sum(await asyncio.gather(*(move(s, d) for s, d in moves)))

    # --- handlers ------------------------------------------------------------------------------

    async def block(self, request: web.Request) -> web.Response:
        vid, state, entry = await self._takedown(request, "block", Event.BLOCK, again=True)
        return web.json_response(
            {"videoId": vid, "state": state.value, "purgeId": entry.id, "seq": entry.seq}
        )

    async def unblock(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request, roles=("operator",))
        vid = request.match_info["id"]
        now = time.time()
        async with self.purges._write, self.engine.begin() as conn:
            v = await get_video(conn, vid)
            if v is None:
                raise ApiError(NOT_FOUND, "no such video")
            if v["state"] != State.BLOCKED.value:
                raise ApiError(
                    VIDEO_STATE,
                    f"the video is {v['state']}, not BLOCKED",
                    extra={"state": v["state"]},
                )
            restored = await self._previous(conn, vid, "block", State.BLOCKED)
            await self._record(conn, vid, "unblock", State.BLOCKED, restored, principal, None, now)
            entry = await self.purges.append(
                conn, "video", (vid,), False, principal.key_id, now, action="unblock"
            )
        self.purges.published(entry)
        await self._forget(request, vid)
        return web.json_response(
            {"videoId": vid, "state": restored.value, "purgeId": entry.id, "seq": entry.seq}
        )

    async def delete(self, request: web.Request) -> web.Response:
        vid = request.match_info["id"]
        async with self._exclusive(vid):
            try:
                taken = await self._takedown(request, "delete", Event.DELETE, again=False)
            except ApiError as e:
                if e.kind is VIDEO_STATE:  # already deleted: finish a move a crash cut short
                    moved = await self._settle(vid, deleted=True)
                    if moved:
                        e.extra["objectsMoved"] = moved
                raise
            vid, state, entry = taken
            moved = await self._settle(vid, deleted=True)
        return web.json_response(
            {
                "videoId": vid,
                "state": state.value,
                "purgeId": entry.id,
                "seq": entry.seq,
                "objectsMoved": moved,
            }
        )

    async def restore(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request, roles=("operator",))
        reason = _reason(await request.read(), request.query.get("reason"), required=False)
        vid = request.match_info["id"]
        async with self._exclusive(vid):
            async with self.engine.connect() as conn:
                v = await get_video(conn, vid)
            if v is None:
                raise ApiError(NOT_FOUND, "no such video")
            if v["state"] != State.DELETED.value:
                moved = await self._settle(vid, deleted=False)  # finish an interrupted restore
                extra: dict[str, Any] = {"state": v["state"]}
                if moved:
                    extra["objectsMoved"] = moved
                raise ApiError(VIDEO_STATE, f"the video is {v['state']}, not DELETED", extra=extra)
            # Back first, then the state: until the commit the video is still refused as
            # deleted everywhere, so nobody sees a playable video with missing objects.
            moved = await self._settle(vid, deleted=False)
            now = time.time()
            async with self.purges._write, self.engine.begin() as conn:
                v = await get_video(conn, vid)
                if v is None or v["state"] != State.DELETED.value:
                    state = v["state"] if v is not None else None
                    raise ApiError(VIDEO_STATE, "the video was restored meanwhile",
                                   extra={"state": state})  # fmt: skip
                restored = await self._previous(conn, vid, "delete", State.DELETED)
                await self._record(
                    conn, vid, "restore", State.DELETED, restored, principal, reason, now
                )
                entry = await self.purges.append(
                    conn, "video", (vid,), False, principal.key_id, now, action="restore"
                )
            self.purges.published(entry)
            await self._forget(request, vid)
        return web.json_response(
            {
                "videoId": vid,
                "state": restored.value,
                "purgeId": entry.id,
                "seq": entry.seq,
                "objectsMoved": moved,
            }
        )

    async def cutoffs(self, request: web.Request) -> web.Response:
        """Every video's revocation cutoff, for a node that (re)starts: `{videoId: cutoff}`.
        With `?refusals=1`, `{cutoffs, refusals: {videoId: "blocked"|"deleted"}}`, so an edge
        that resumes the log past a takedown still answers an old token 451/410 as the
        playback API does (issue 11); the plain shape stays for nodes that do not ask."""
        stmt = select(video_cutoffs.c.video_id, video_cutoffs.c.cutoff, videos.c.state).select_from(
            video_cutoffs.outerjoin(videos, videos.c.id == video_cutoffs.c.video_id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        cutoffs = {r.video_id: r.cutoff for r in rows}
        body: dict[str, Any] = cutoffs
        if request.query.get("refusals") == "1":
            refusals = {r.video_id: _REFUSALS[r.state] for r in rows if r.state in _REFUSALS}
            body = {"cutoffs": cutoffs, "refusals": refusals}
        return web.json_response(body, headers={"Cache-Control": "no-store"})
