"""Video resources and playback authorization.

`GET /v1/videos/{id}` shows the video in any state but two: a taken-down video answers 451
(blocked) or 410 (deleted), with its `state` in the error, and shows nothing else (title and
description may be what it was taken down for). `GET /v1/videos/{id}/playback` hands out signed
URLs only when the video is READY (DESIGN.md): 409 with the state before that, 404 unknown, 451
blocked, 410 deleted. URLs carry the token in the path so relative manifest URLs keep it:
`{edge}/v/{videoId}/{token}/{version}/master.m3u8`. Every playback answer also carries a new
`sessionId` (`control.playback_sessions`: signed, bound to the video), the only session id
whose playback events count views; the memoised answer holds a placeholder of the same length
that each request's id replaces, so the answer's bytes are still made once per second.

Rows come from a read-through cache (`control.metacache`: this process's memory, then Redis
when configured, then the database), READY rows and negative answers (unknown, blocked,
deleted) alike, so a hot video, or a player hammering a taken-down one, costs no database
read; PATCH and moderation invalidate the video's entry when they change it (staleness bounds
for changes made elsewhere, e.g. the transcoder's publish, are in `control.metacache`). The
cached row carries the video's revocation cutoff, so playback reads nothing else; tokens are
minted once per video, second and signing key (Ed25519 is deterministic, so a second mint
would give the same bytes anyway), and the answer's bytes are made once per video and second
too. A plain `GET …/playback` of a public READY video whose row is in this process's memory
is answered below aiohttp, from the connection's `data_received` (`PlaybackFastPath`: the
same bytes, metrics, access line and IP rate limit, without aiohttp's per-request machinery);
anything else about the request or the video goes the full path.

Visibility (issue 6: "private and unlisted videos are never in search and get playback tokens
only for their owner or operator"; the rule is `control.visibility`, which engagement shares);
the owner is the key that created the video, and operators may do what owners may
(`control.auth.may_manage`):
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
it); a change to the same values writes nothing. A change to a more restricted visibility
(public → unlisted → private) also sets the video's token cutoff and drops its cached objects
through the purge log, as a block does (`control.moderation.restrict_tokens`): tokens issued
before it stop playing at every edge, the owner's new ones play. Answers 200 with the video.
The video is then invalidated in the metadata cache, as moderation does.

`GET /v1/me/videos?limit=&cursor=` (any key): the caller's own videos, newest first, cursor
paginated (`control.listing`): `{results: [video…], nextCursor}`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from control.auth import Principal, authenticate, may_manage
from control.engagement import counters, counters_many
from control.ids import is_id
from control.listing import owner_page, page_query
from control.metacache import ABSENT, METACACHE_KEY, MetaCache
from control.moderation import restrict_tokens
from control.negcache import MISSING, NegativeCache
from control.playback_sessions import SESSION_ID_CHARS, SessionSigner
from control.purges import Purges
from control.ratelimit import RATE_LIMITERS_KEY, RateLimiter
from control.validation import decode_json, video_patch
from control.visibility import VideoRow, check_viewer, load_video, refusal, restricts
from vodcore import metrics
from vodcore.config import Settings
from vodcore.db.schema import videos
from vodcore.db.videos import append_event, get_video
from vodcore.errors import (
    FORBIDDEN,
    NOT_FOUND,
    NOT_READY,
    ApiError,
)
from vodcore.fastpath import sniff
from vodcore.purge import Purge
from vodcore.server import FAST_PATH_KEY, fast_path_skippable, write_access_line
from vodcore.tokens import SigningKeys

__all__ = ["VideoRow", "refusal"]  # re-exported: the rule lives in `control.visibility`


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def video_json(v: VideoRow, views: int = 0, likes: int = 0) -> dict[str, Any]:
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


def _json(body: Any, headers: dict[str, str]) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), content_type="application/json", charset="utf-8", headers=headers
    )


NO_STORE = {"Cache-Control": "no-store"}
PRIVATE_NO_STORE = {"Cache-Control": "private, no-store"}


class Videos:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        keys: SigningKeys,
        negative: NegativeCache | None = None,
        meta: MetaCache | None = None,
        sessions: SessionSigner | None = None,
        purges: Purges | None = None,
    ) -> None:
        # the purge log, for a PATCH that restricts visibility (None: no cutoff, as in tests
        # that run this class alone)
        self.purges = purges
        self.settings = settings
        # playback sessions (`sessionId`) for the events API; `control.app` shares one signer
        # with `control.engagement`, which checks them
        self.sessions = (
            sessions if sessions is not None else SessionSigner.load_or_create(settings.keys_dir)
        )
        self.engine = engine
        self.keys = keys
        # Kept for callers that still share one with moderation; the metadata cache now holds
        # the negative answers too.
        self.negative = negative if negative is not None else NegativeCache()
        self.meta = meta if meta is not None else MetaCache.from_settings(settings, engine)
        self._tokens: dict[tuple[str, int, str], tuple[str, str | None]] = {}
        self._tokens_at = 0  # the second `_tokens` and `_answers` were made in
        # video id -> (the cached row it was made from, token, JSON body, whole HTTP answer)
        self._answers: dict[str, tuple[VideoRow, str, bytes, bytes | None]] = {}

    def routes(self, app: web.Application) -> None:
        # Moderation finds the cache here when it is not handed one (control.moderation).
        if METACACHE_KEY not in app:
            app[METACACHE_KEY] = self.meta
        app.on_cleanup.append(self.meta.close)
        app.router.add_get("/v1/videos/{id}", self.get)
        app.router.add_patch("/v1/videos/{id}", self.patch)
        app.router.add_get("/v1/videos/{id}/playback", self.playback)
        app.router.add_get("/v1/me/videos", self.mine)
        app.router.add_get("/v1/keys/jwks.json", self.jwks)
        if FAST_PATH_KEY not in app:
            app[FAST_PATH_KEY] = PlaybackFastPath(self, app)

    async def _load(self, video_id: str) -> VideoRow:
        """The video (its cached row, with its "cutoff"), unless it is unknown, blocked or
        deleted (404, 451, 410)."""
        return await load_video(self.meta.get, video_id)

    async def _viewer(self, request: web.Request, v: VideoRow, *, play: bool) -> Principal | None:
        """Refuse a caller who may not see (or, with `play`, play) a non-public video
        (`control.visibility`, the rule engagement shares)."""
        return await check_viewer(self.engine, request, v, play=play)

    async def get(self, request: web.Request) -> web.Response:
        v = await self._load(request.match_info["id"])
        await self._viewer(request, v, play=False)
        async with self.engine.connect() as conn:
            views, likes = await counters(conn, v["id"])
        return _json(video_json(v, views, likes), NO_STORE)

    async def patch(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request)
        changes = video_patch(decode_json(await request.read()))
        video_id = request.match_info["id"]
        if not is_id(video_id, "vid"):
            raise ApiError(NOT_FOUND, "no such video")
        now = time.time()
        entries: list[Purge] = []
        # the purge log's writer lock (as moderation takes it) only when the log may be written
        lock: contextlib.AbstractAsyncContextManager[Any] = (
            self.purges._write
            if self.purges is not None and "visibility" in changes
            else contextlib.nullcontext()
        )
        async with lock, self.engine.begin() as conn:
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
                if (
                    self.purges is not None
                    and "visibility" in changed
                    and restricts(str(v["visibility"]), changed["visibility"])
                ):
                    # issue 11: old tokens kept playing for hours after a video went private
                    entries = await restrict_tokens(
                        self.purges, conn, video_id, principal.key_id, now
                    )
                v = await get_video(conn, video_id)
                assert v is not None
            views, likes = await counters(conn, video_id)
        if self.purges is not None:
            for entry in entries:
                self.purges.published(entry)
        self.negative.forget(video_id)
        await self.meta.invalidate(video_id)
        return _json(video_json(v, views, likes), NO_STORE)

    @staticmethod
    def _may_edit(principal: Principal, v: VideoRow) -> None:
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
        return _json(
            {"results": [video_json(v, *counts[v["id"]]) for v in page], "nextCursor": nxt},
            PRIVATE_NO_STORE,
        )

    async def playback(self, request: web.Request) -> web.Response:
        v = await self._load(request.match_info["id"])
        await self._viewer(request, v, play=True)
        state = v["state"]
        if state != "READY" or v["current_version"] is None:
            raise ApiError(NOT_READY, f"the video is {state}, not READY", extra={"state": state})
        return web.Response(
            body=self._with_session(self._answer(v)[2], v["id"]),
            content_type="application/json",
            charset="utf-8",
            headers=PRIVATE_NO_STORE,
        )

    def _answer(self, v: VideoRow) -> tuple[VideoRow, str, bytes, bytes | None]:
        """The playback answer for a READY video's cached row: (row, token, JSON body, whole
        HTTP response or None until `playback_response` made it). The same bytes for every
        request of one second and row, so they are made once per video and second."""
        token, expires = self._token(v["id"], v["cutoff"])
        memo = self._answers.get(v["id"])
        if memo is not None and memo[0] is v and memo[1] == token:
            return memo
        body = {
            "videoId": v["id"],
            "state": v["state"],
            **playback_urls(
                self.settings.edge_url,
                v["id"],
                token,
                int(v["current_version"]),
                v["thumbnails"],
            ),
            "durationSeconds": v["duration_seconds"],
            "expiresAt": expires,
            # every answer gets its own session: the memoised bytes hold a placeholder of the
            # same length, replaced per request (`_with_session`)
            "sessionId": SESSION_PLACEHOLDER,
        }
        memo = self._answers[v["id"]] = (v, token, orjson.dumps(body), None)
        return memo

    def _with_session(self, data: bytes, video_id: str) -> bytes:
        """`data` (a memoised body or response) with a new playback session in it: one HMAC
        and one replace of a fixed-length placeholder (Content-Length does not change)."""
        sid = self.sessions.mint(video_id, int(time.time()))
        return data.replace(_PLACEHOLDER_BYTES, sid.encode("ascii"), 1)

    def playback_response(self, v: VideoRow) -> tuple[bytes, int]:
        """The whole HTTP/1.1 response `playback` gives for a READY video's cached row, as
        aiohttp would send it (the same fields in the same order), and its body's length."""
        whole, length = self._playback_template(v)
        return self._with_session(whole, v["id"]), length

    def _playback_template(self, v: VideoRow) -> tuple[bytes, int]:
        memo = self._answer(v)
        whole = memo[3]
        if whole is None:
            body = memo[2]
            head = (
                "HTTP/1.1 200 OK\r\n"
                "Cache-Control: private, no-store\r\n"
                "Content-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Date: {rfc822_formatted_time()}\r\n"
                f"Server: {SERVER_SOFTWARE}\r\n\r\n"
            )
            whole = head.encode("latin-1") + body
            self._answers[v["id"]] = (memo[0], memo[1], body, whole)
        return whole, len(memo[2])

    def _token(self, video_id: str, cutoff: float | None) -> tuple[str, str | None]:
        """A playback token for the video and its expiry; the same for every request of one
        second (the claims are whole seconds), so it is minted once per video and second."""
        now = int(time.time())
        if now != self._tokens_at or len(self._tokens) >= 10_000:
            self._tokens.clear()
            self._answers.clear()  # they hold this second's tokens (and Date)
            self._tokens_at = now
        # A token issued in the second of a takedown would read as older than its cutoff.
        issued = max(now, math.ceil(cutoff)) if cutoff is not None else now
        key = (video_id, issued, self.keys.current_kid)
        hit = self._tokens.get(key)
        if hit is None:
            ttl = self.settings.token_ttl_seconds
            hit = (self.keys.mint(video_id, issued, ttl + issued - now), iso(now + ttl))
            self._tokens[key] = hit
        return hit

    async def jwks(self, _request: web.Request) -> web.Response:
        # Public keys only; edges cache them. Short max-age so rotation propagates quickly.
        return web.json_response(self.keys.jwks(), headers={"Cache-Control": "max-age=60"})


PLAYBACK_PREFIX = b"GET /v1/videos/"
# '~' is in no token, URL or JSON number of the answer: the placeholder is found only where
# it was put
SESSION_PLACEHOLDER = "ps1." + "~" * (SESSION_ID_CHARS - 4)
_PLACEHOLDER_BYTES = SESSION_PLACEHOLDER.encode("ascii")


class PlaybackFastPath:
    """`GET /v1/videos/{id}/playback` of a public READY video whose row this process holds in
    memory, answered from the protocol's `data_received` (`vodcore.server.FastResponder`)
    with one write, without aiohttp's request, response, router and middleware machinery,
    which cost a hot playback answer ~70% of its time (profile in bench/RESULTS.md).

    It answers only when all of these hold, else aiohttp gets the bytes as usual:
    - the bytes are one complete bodiless `GET /v1/videos/{id}/playback HTTP/1.1` head with
      no query and only header fields from `vodcore.fastpath.ALLOWED_FIELDS` (so no
      Authorization: a key is charged to its own bucket on the full path);
    - the app runs no middleware beyond those the fast path stands in for (metrics and errors,
      `vodcore.server.fast_path_may_skip`, and the rate limiters it applies itself, at most
      one of them enabled and none in Redis) and no `on_response_prepare` hook (CORS adds
      fields there): decided once, when the first request comes, the app being frozen;
    - `Videos.meta`'s local level holds the row (a miss, an expired entry, a negative answer
      go the full path, which reads through and refills it), and the video is READY, public
      and has a current version (unlisted and private ones need a key);
    - the client IP's bucket has a token (the fast path takes it as the middleware would;
      a refusal goes the full path, which answers the 429).
    The answer is byte for byte what `Videos.playback` sends through aiohttp (the same fields
    in the same order, the same body), made once per video and second (`playback_response`).
    Metrics and the access log line are kept.
    """

    def __init__(self, videos: Videos, app: web.Application, *, access_log: bool = True) -> None:
        self.videos = videos
        self.app = app
        self.access_log = access_log
        self.served = 0
        self._usable: bool | None = None  # decided at the first request
        self._limiter: RateLimiter | None = None
        self._requests = metrics.REQUESTS.labels("control", "GET", "200")
        self._latency = metrics.LATENCY.labels("control")
        self._answers = metrics.FAST_ANSWERS.labels("control")

    def _bind(self) -> bool:
        app = self.app
        if not app.frozen:
            return False  # middlewares may still change: ask again next time
        limiters = app.get(RATE_LIMITERS_KEY) or []
        theirs = [lim.installed for lim in limiters if lim.installed is not None]
        for mw in app.middlewares:
            if not fast_path_skippable(mw) and not any(mw is t for t in theirs):
                self._usable = False
                return False
        enabled = [lim for lim in limiters if lim.enabled]
        if (
            app.on_response_prepare
            or len(enabled) > 1
            or not all(lim.synchronous for lim in enabled)
        ):
            self._usable = False
            return False
        self._limiter = enabled[0] if enabled else None
        self._usable = True
        return True

    def answer(self, data: bytes, write: Callable[[bytes], None], remote: str | None) -> bool:
        if not data.startswith(PLAYBACK_PREFIX):
            return False
        t0 = time.perf_counter()
        req = sniff(data)
        if req is None or req.head:
            return False
        target = req.target
        video_id = target[11:-9]  # "/v1/videos/" id "/playback"
        if not target.endswith("/playback") or not is_id(video_id, "vid"):
            return False
        if not (self._usable or (self._usable is None and self._bind())):
            return False
        meta = self.videos.meta
        v = meta.peek(video_id)  # (a hit near the entry's end re-reads it in the background)
        if (
            v is ABSENT
            or v is None
            or v["state"] != "READY"
            or v["visibility"] != "public"
            or v["current_version"] is None
        ):
            return False
        limiter = self._limiter
        if limiter is not None and limiter.check_now(remote, "") > 0:
            return False  # the full path refuses it (429) with the same bucket
        whole, length = self.videos.playback_response(v)
        write(whole)  # the point of no return: nothing below may fail the request
        self.served += 1
        self._requests.inc()
        self._answers.inc()
        self._latency.observe(time.perf_counter() - t0)
        if self.access_log:
            seconds = time.perf_counter() - t0
            write_access_line(remote, f"GET {target} HTTP/1.1", 200, length, seconds)
        return True
