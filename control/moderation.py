"""Takedowns (issue 4): block and unblock, recorded (who, when, why, the state before).

Block, in one transaction: the video moves to BLOCKED (the playback API then answers 451), its
token revocation cutoff is set to now (tokens issued before it are void), the action is
recorded and logged as an event, and a `block` entry is appended to the purge log. Every edge
and shield applies that entry in order: cached objects of the video are dropped and edges refuse
the video's older tokens. Unblock restores the recorded state; the cutoff stays, so only tokens
issued after the block (by the playback API) play again.
"""

from __future__ import annotations

import time

from aiohttp import web
from sqlalchemy import select, update

from control.auth import authenticate
from control.purges import Purges
from control.validation import decode_json
from vodcore.db.schema import moderation, video_cutoffs, videos
from vodcore.db.videos import append_event, get_video
from vodcore.errors import NOT_FOUND, UPLOAD_STATE, VALIDATION, ApiError
from vodcore.lifecycle import Event, IllegalTransition, State, next_state


class Moderation:
    def __init__(self, purges: Purges) -> None:
        self.purges = purges
        self.engine = purges.engine

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/videos/{id}/block", self.block)
        app.router.add_post("/v1/videos/{id}/unblock", self.unblock)
        app.router.add_get("/v1/cutoffs", self.cutoffs)

    async def block(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request, roles=("operator",))
        doc = decode_json(await request.read())
        reason = doc.get("reason") if isinstance(doc, dict) else None
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
            raise ApiError(VALIDATION, "reason: a short text is required")
        vid = request.match_info["id"]
        now = time.time()
        async with self.purges._write, self.engine.begin() as conn:
            v = await get_video(conn, vid)
            if v is None:
                raise ApiError(NOT_FOUND, "no such video")
            before = State(v["state"])
            try:
                state = next_state(before, Event.BLOCK)
            except IllegalTransition as e:
                raise ApiError(UPLOAD_STATE, str(e)) from None
            await conn.execute(
                update(videos).where(videos.c.id == vid).values(state=state.value, updated_at=now)
            )
            await conn.execute(
                moderation.insert().values(
                    video_id=vid, action="block", reason=reason.strip(),
                    actor=principal.key_id, previous_state=before.value, at=now,
                )
            )  # fmt: skip
            res = await conn.execute(
                update(video_cutoffs).where(video_cutoffs.c.video_id == vid).values(cutoff=now)
            )
            if res.rowcount == 0:
                await conn.execute(video_cutoffs.insert().values(video_id=vid, cutoff=now))
            await append_event(
                conn, "video.blocked", vid,
                {"from": before.value, "reason": reason.strip(), "by": principal.key_id}, now,
            )  # fmt: skip
            entry = await self.purges.append(
                conn, "video", (vid,), False, principal.key_id, now, action="block", cutoff=now
            )
        self.purges.published(entry)
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
                raise ApiError(UPLOAD_STATE, f"the video is {v['state']}, not BLOCKED")
            last = (
                await conn.execute(
                    select(moderation.c.previous_state)
                    .where(moderation.c.video_id == vid, moderation.c.action == "block")
                    .order_by(moderation.c.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            restored = State(last) if last and last != State.BLOCKED.value else State.READY
            await conn.execute(
                update(videos)
                .where(videos.c.id == vid)
                .values(state=restored.value, updated_at=now)
            )
            await conn.execute(
                moderation.insert().values(
                    video_id=vid, action="unblock", reason=None, actor=principal.key_id,
                    previous_state=State.BLOCKED.value, at=now,
                )
            )  # fmt: skip
            await append_event(
                conn, "video.unblocked", vid, {"to": restored.value, "by": principal.key_id}, now
            )
        return web.json_response({"videoId": vid, "state": restored.value})

    async def cutoffs(self, _request: web.Request) -> web.Response:
        """Every video's revocation cutoff, for a node that (re)starts."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(video_cutoffs))).all()
        return web.json_response(
            {r.video_id: r.cutoff for r in rows}, headers={"Cache-Control": "no-store"}
        )
