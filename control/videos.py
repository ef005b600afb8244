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
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from control.ids import is_id
from control.negcache import MISSING, NegativeCache
from vodcore.config import Settings
from vodcore.db.schema import video_cutoffs
from vodcore.db.videos import get_video
from vodcore.errors import BLOCKED, GONE, NOT_FOUND, NOT_READY, ApiError
from vodcore.lifecycle import State
from vodcore.tokens import SigningKeys


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def video_json(v: RowMapping) -> dict[str, Any]:
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
        "viewCount": 0,
        "likeCount": 0,
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
        app.router.add_get("/v1/videos/{id}/playback", self.playback)
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

    async def get(self, request: web.Request) -> web.Response:
        v = await self._load(request.match_info["id"])
        return web.json_response(video_json(v), headers={"Cache-Control": "no-store"})

    async def playback(self, request: web.Request) -> web.Response:
        v = await self._load(request.match_info["id"])
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
