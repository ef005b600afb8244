"""Video resources and playback authorization.

`GET /v1/videos/{id}` shows the video in any state but two: a taken-down video answers 451
(blocked) or 410 (deleted), with its `state` in the error, and shows nothing else (title and
description may be what it was taken down for). `GET /v1/videos/{id}/playback` hands out signed
URLs only when the video is READY (DESIGN.md): 409 with the state before that, 404 unknown, 451
blocked, 410 deleted. URLs carry the token in the path so relative manifest URLs keep it:
`{edge}/v/{videoId}/{token}/{version}/master.m3u8`.

Negative answers (unknown, blocked, deleted) are remembered for `negcache.TTL_SECONDS` in this
process (`control.negcache`), so a player hammering a taken-down video costs no database read;
moderation forgets the video's entry when it changes its state.

Visibility (issue 6: "private and unlisted videos are never in search and get playback tokens
only for their owner or operator"); the owner is the key that created the video, and operators
may do what owners may (`control.auth.may_manage`):
- public: anyone sees it and gets playback URLs, no key needed (keys are not even checked);
- unlisted: anyone with the id may see its resource (the link is the point of unlisted), but
  playback needs the owner's or an operator's key: 401 without a key, 403 with another key;
- private: for anyone else, with or without a key (a bad one included), both calls answer 404
  exactly as for an unknown video, so a stranger cannot tell that it exists.
Per-viewer refusals are not put in the negative cache (it holds answers that are the same for
everyone). Public videos cost no key lookup; the others one.

`PATCH /v1/videos/{id}` changes title, description and visibility (`validation.video_patch`:
unknown fields, wrong types, an empty title, over-long text are 422). It needs a key (401),
the owner's or an operator's (403; 404 when the video is private, as above); blocked and
deleted videos are refused as by GET (451, 410). In one transaction it re-reads the row (FOR
UPDATE on PostgreSQL), updates the fields whose values differ and appends a `video.updated`
event whose payload is exactly those fields with their new values (the search indexer follows
it); a change to the same values writes nothing. Answers 200 with the video. The video is then
forgotten in the negative cache, as moderation does.

`GET /v1/me/videos?limit=&cursor=` (any key): the caller's own videos, newest first, cursor
paginated (`control.listing`): `{results: [video…], nextCursor}`.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from control.auth import Principal, authenticate, may_manage, optional_principal
from control.engagement import counters, counters_many
from control.ids import is_id
from control.listing import owner_page, page_query
from control.negcache import MISSING, NegativeCache
from control.validation import decode_json, video_patch
from vodcore.config import Settings
from vodcore.db.schema import video_cutoffs, videos
from vodcore.db.videos import append_event, get_video
from vodcore.errors import (
    BLOCKED,
    FORBIDDEN,
    GONE,
    NOT_FOUND,
    NOT_READY,
    UNAUTHENTICATED,
    ApiError,
)
from vodcore.lifecycle import State
from vodcore.tokens import SigningKeys


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def video_json(v: RowMapping, views: int = 0, likes: int = 0) -> dict[str, Any]:
    return {
        "videoId": v["id"],
        "title": v["title"],
        "description": v["description"],
        "visibility": v["visibility"],
        "state": v["state"],
        "failureReason": v["failure_reason"],
        "version": v["current_version"],
        "durationSeconds": v["duration_seconds"],
        "width": v["width"],
        "height": v["height"],
        "renditions": v["renditions"] or [],
        "progress": v["progress"],
        # seek-bar sprites (a WebVTT thumbnail track; its URL comes with a playback token)
        "thumbnails": v["thumbnails"],
        "quality": v["quality"],  # VMAF per rung of the full ladder, when measured
        "sizeBytes": v["size_bytes"],
        "createdAt": iso(v["created_at"]),
        "readyAt": iso(v["ready_at"]),
        "viewCount": views,
        "likeCount": likes,
    }


def playback_urls(
    edge: str,
    video_id: str,
    token: str,
    version: int,
    thumbnails: dict[str, Any] | None = None,
) -> dict[str, str | None]:
    base = f"{edge}/v/{video_id}/{token}/{version}"
    vtt = None
    if thumbnails and thumbnails.get("vtt") and thumbnails.get("version"):
        vtt = f"{edge}/v/{video_id}/{token}/{int(thumbnails['version'])}/{thumbnails['vtt']}"
    return {
        "manifestUrl": f"{base}/master.m3u8",
        "dashUrl": f"{base}/manifest.mpd",
        "thumbnailUrl": f"{base}/poster.jpg",
        "thumbnailsVttUrl": vtt,  # seek-bar previews (WebVTT with #xywh= sprite tiles)
    }


def refusal(state: str) -> ApiError | None:
    """The error for a negative answer: unknown, blocked, deleted; None for any other state."""
    if state == MISSING:
        return ApiError(NOT_FOUND, "no such video")
    if state == State.BLOCKED:
        return ApiError(BLOCKED, extra={"state": state})
    if state == State.DELETED:
        return ApiError(GONE, "the video was deleted", extra={"state": state})
    return None


class Videos:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        keys: SigningKeys,
        negative: NegativeCache | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.keys = keys
        self.negative = negative if negative is not None else NegativeCache()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/videos/{id}", self.get)
        app.router.add_patch("/v1/videos/{id}", self.patch)
        app.router.add_get("/v1/videos/{id}/playback", self.playback)
        app.router.add_get("/v1/me/videos", self.mine)
        app.router.add_get("/v1/keys/jwks.json", self.jwks)

    async def _load(self, video_id: str) -> RowMapping:
        """The video, unless it is unknown, blocked or deleted (404, 451, 410; remembered)."""
        if not is_id(video_id, "vid"):
            raise ApiError(NOT_FOUND, "no such video")
        neg = self.negative
        known = neg.get(video_id, time.monotonic())
        if known is not None and (err := refusal(known)) is not None:
            raise err
        epoch = neg.epoch  # before the read: an invalidation meanwhile keeps it out
        async with self.engine.connect() as conn:
            v = await get_video(conn, video_id)
        state = MISSING if v is None else str(v["state"])
        err = refusal(state)
        if err is not None:
            neg.put(video_id, state, time.monotonic(), epoch)
            raise err
        assert v is not None
        return v

    async def _viewer(self, request: web.Request, v: RowMapping, *, play: bool) -> None:
        """Refuse a caller who may not see (or, with `play`, play) a non-public video."""
        visibility = v["visibility"]
        if visibility == "public":
            return
        try:
            principal = await optional_principal(self.engine, request)
        except ApiError as e:
            if visibility == "private" and e.kind in (UNAUTHENTICATED, FORBIDDEN):
                raise ApiError(NOT_FOUND, "no such video") from None
            raise
        if may_manage(principal, v["owner_key_id"]):
            return
        if visibility == "private":
            raise ApiError(NOT_FOUND, "no such video")
        if play:  # unlisted
            if principal is None:
                raise ApiError(
                    UNAUTHENTICATED,
                    "an unlisted video plays only for its owner or an operator",
                    headers={"WWW-Authenticate": 'Bearer realm="vodstack"'},
                )
            raise ApiError(FORBIDDEN, "an unlisted video plays only for its owner or an operator")

    async def get(self, request: web.Request) -> web.Response:
        v = await self._load(request.match_info["id"])
        await self._viewer(request, v, play=False)
        async with self.engine.connect() as conn:
            views, likes = await counters(conn, v["id"])
        return web.json_response(video_json(v, views, likes), headers={"Cache-Control": "no-store"})

    async def patch(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request)
        changes = video_patch(decode_json(await request.read()))
        video_id = request.match_info["id"]
        if not is_id(video_id, "vid"):
            raise ApiError(NOT_FOUND, "no such video")
        now = time.time()
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(select(videos).where(videos.c.id == video_id).with_for_update())
            ).first()
            v = row._mapping if row is not None else None
            err = refusal(MISSING if v is None else str(v["state"]))
            if err is not None:
                raise err
            assert v is not None
            self._may_edit(principal, v)
            changed = {k: val for k, val in changes.items() if v[k] != val}
            if changed:
                await conn.execute(
                    update(videos).where(videos.c.id == video_id).values(**changed, updated_at=now)
                )
                await append_event(conn, "video.updated", video_id, dict(changed), now)
                v = await get_video(conn, video_id)
                assert v is not None
            views, likes = await counters(conn, video_id)
        self.negative.forget(video_id)
        return web.json_response(video_json(v, views, likes), headers={"Cache-Control": "no-store"})

    @staticmethod
    def _may_edit(principal: Principal, v: RowMapping) -> None:
        if may_manage(principal, v["owner_key_id"]):
            return
        if v["visibility"] == "private":
            raise ApiError(NOT_FOUND, "no such video")
        raise ApiError(FORBIDDEN, "only the video's owner or an operator may change it")

    async def mine(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request)
        limit, after = page_query(request.query)
        async with self.engine.connect() as conn:
            page, nxt = await owner_page(conn, principal.key_id, limit, after)
            counts = await counters_many(conn, [v["id"] for v in page])
        return web.json_response(
            {"results": [video_json(v, *counts[v["id"]]) for v in page], "nextCursor": nxt},
            headers={"Cache-Control": "private, no-store"},
        )

    async def playback(self, request: web.Request) -> web.Response:
        v = await self._load(request.match_info["id"])
        await self._viewer(request, v, play=True)
        state = State(v["state"])
        if state is not State.READY or v["current_version"] is None:
            raise ApiError(
                NOT_READY, f"the video is {state.value}, not READY", extra={"state": state.value}
            )
        now = int(time.time())
        ttl = self.settings.token_ttl_seconds
        async with self.engine.connect() as conn:
            cutoff = (
                await conn.execute(
                    select(video_cutoffs.c.cutoff).where(video_cutoffs.c.video_id == v["id"])
                )
            ).scalar_one_or_none()
        # A token issued in the second of a takedown would read as older than its cutoff.
        issued = max(now, math.ceil(cutoff)) if cutoff is not None else now
        token = self.keys.mint(v["id"], issued, ttl + issued - now)
        body = {
            "videoId": v["id"],
            "state": state.value,
            **playback_urls(
                self.settings.edge_url,
                v["id"],
                token,
                int(v["current_version"]),
                v["thumbnails"],
            ),
            "durationSeconds": v["duration_seconds"],
            "expiresAt": iso(now + ttl),
        }
        return web.json_response(body, headers={"Cache-Control": "private, no-store"})

    async def jwks(self, _request: web.Request) -> web.Response:
        # Public keys only; edges cache them. Short max-age so rotation propagates quickly.
        return web.json_response(self.keys.jwks(), headers={"Cache-Control": "max-age=60"})
