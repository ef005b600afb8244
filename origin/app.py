"""The origin tier: serves encoded media from the object store.

`GET`/`HEAD /v/{videoId}/{rest…}` reads object `media/{videoId}/{rest…}`. The raw path is
validated before anything touches the store (traversal, encoded separators, NUL → 400). Answers
carry ETag (the store's strong validator), Last-Modified, Accept-Ranges, the Cache-Control from
`origin.policy`, and `Surrogate-Key: {videoId}` so purges can find every object of a video.
Conditional and Range requests are decided by `vodcore.cache.conditional` (RFC 9110 §13, §14),
the same code the caches use. The origin is not a cache and sets no X-Cache.

Bodies: a store with the `local_path` capability (the filesystem) is sent by `sendfile(2)`
(`vodcore.sendfile`); any other store (S3) is streamed from `ObjectStore.open_range`, which for
a Range request fetches only that range from the backend. A client that leaves mid-body, or an
object that turns out shorter than its stat, aborts the connection (a short body must never
look complete to a cache) without a traceback or a 500 in the log.

Takedowns (issue 4): started with `control_url` (`vod origin --control URL`; `vod up` passes
it), the origin follows control's purge log (`PurgeFeed`, tier `origin`) and refuses every
object of a blocked video with 451 `blocked` and of a deleted one with 410 `gone` (JSON from
the error catalogue, `Cache-Control: no-store`), before the store is asked; `unblock` and
`restore` lift it (`origin.takedowns` holds the rules). It keeps no state file: at each start it
replays the log from seq 0, applying only the takedown entries (and acknowledging only those, plus
its highest seq), so once control says the backlog is out (`live`) its set of refused videos is
exact. Until then it fails open: it serves, and logs one warning, because an origin that refused
everything while control is unreachable would take the whole catalogue down, and the other
guards hold meanwhile (the playback API refuses, edges refuse the videos' older tokens, and a
deleted video's objects are no longer under `media/`). Without `control_url` it refuses nothing.

Trust (issue 11): with `tier_secret` set the origin answers only requests its shields and edges
signed (`vodcore.tierauth`; 403 JSON otherwise, `/healthz` and `/metrics` excepted). Without
one it serves every object to anyone who reaches it: keep it on a private network.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from email.utils import formatdate

import aiohttp
from aiohttp import web

from origin import policy
from origin.takedowns import Takedowns, is_takedown_entry
from vodcore import metrics
from vodcore.cache import conditional
from vodcore.cache.policy import fold_headers
from vodcore.cache.purgefeed import PurgeFeed
from vodcore.config import Settings
from vodcore.errors import BLOCKED, GONE, NOT_FOUND, RANGE_NOT_SATISFIABLE, UNAVAILABLE, ApiError
from vodcore.purge import Purge
from vodcore.sendfile import StaleStat, abort, open_for_range, send_file_range
from vodcore.server import base_app, media_segments
from vodcore.store import ObjectInfo, ObjectNotFound, ObjectStore
from vodcore.store.factory import close_store, make_store
from vodcore.tierauth import TierAuth
from vodcore.tierguard import install as install_tier_guard

TIER = "origin"
log = logging.getLogger("vod.origin")
STORE_KEY: web.AppKey[ObjectStore] = web.AppKey("store", ObjectStore)


class Guard:
    """The origin's side of takedowns: the purge feed it follows and what it refuses."""

    def __init__(self, feed: PurgeFeed | None = None) -> None:
        self.takedowns = Takedowns()
        self.feed = feed
        self._warned = False

    def apply(self, p: Purge) -> None:
        if self.takedowns.apply(p):
            log.info("purge log seq %d: %s %s", p.seq, p.action, ",".join(p.targets))

    def check(self, vid: str) -> None:
        """Raise the refusal for a taken-down video; fail open while the log is replayed."""
        refusal = self.takedowns.refusal(vid)
        if refusal == "blocked":
            raise ApiError(BLOCKED, extra={"state": "BLOCKED"})
        if refusal == "deleted":
            raise ApiError(GONE, "the video was deleted", extra={"state": "DELETED"})
        if self.feed is not None and not self.feed.caught_up and not self._warned:
            self._warned = True
            log.warning(
                "serving before the purge log has been replayed (applied up to seq %d): "
                "takedowns are not enforced by the origin yet",
                self.feed.applied,
            )


GUARD_KEY: web.AppKey[Guard] = web.AppKey("guard", Guard)


def object_key(raw_path: str) -> tuple[str, str, list[str]]:
    """(object key, video id, segments after the video id) for a raw request path."""
    segs = media_segments(raw_path, 3)
    vid, rest = segs[1], segs[2:]
    return "/".join(["media", vid, *rest]), vid, rest


def _headers(info: ObjectInfo, vid: str, rest: list[str]) -> dict[str, str]:
    return {
        "ETag": info.etag,
        "Last-Modified": formatdate(info.mtime, usegmt=True),  # RFC 9110 §8.8.2
        "Cache-Control": policy.cache_control(rest),
        "Surrogate-Key": vid,
        "Accept-Ranges": "bytes",  # RFC 9110 §14.3
    }


async def serve_media(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE_KEY]
    key, vid, rest = object_key(request.raw_path)
    request.app[GUARD_KEY].check(vid)
    path = store.local_path(key)
    # A file replaced between stat and open would pair new bytes with old validators; retry
    # the (cheap) stat when that happens. Objects are immutable, so this is a rare race.
    for _attempt in range(3):
        try:
            info = await store.stat(key)
        except ObjectNotFound:
            raise ApiError(NOT_FOUND, "no such object") from None
        headers = _headers(info, vid, rest)
        sel = conditional.select(
            request.method,
            fold_headers(request.headers.items()),
            size=info.size,
            etag=info.etag,
            last_modified=info.mtime,
        )
        start, length, status = 0, info.size, 200
        match sel.outcome:
            case conditional.Outcome.NOT_MODIFIED:
                return web.Response(status=304, headers=headers)  # RFC 9110 §15.4.5
            case conditional.Outcome.UNSATISFIABLE:
                headers = {"Content-Range": f"bytes */{info.size}"}  # RFC 9110 §14.4
                raise ApiError(RANGE_NOT_SATISFIABLE, headers=headers)
            case conditional.Outcome.PARTIAL:
                assert sel.range is not None
                start, length, status = sel.range.start, sel.range.length, 206
                headers["Content-Range"] = sel.range.content_range(info.size)
            case conditional.Outcome.FULL:
                pass

        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = policy.content_type(rest[-1])
        resp.content_length = length
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        if path is None:
            return await _stream(request, resp, store, key, start, length)
        try:
            f = await asyncio.to_thread(
                open_for_range,
                path,
                start,
                length,
                expect_size=info.size,
                expect_mtime=info.mtime,
            )
        except StaleStat:
            continue
        except OSError:
            raise ApiError(NOT_FOUND, "no such object") from None
        if await send_file_range(request, resp, path, start, length, file=f):
            metrics.BYTES_SENT.labels(TIER).inc(length)
        return resp
    raise ApiError(UNAVAILABLE, "the object is being replaced; retry")


async def _stream(
    request: web.Request,
    resp: web.StreamResponse,
    store: ObjectStore,
    key: str,
    start: int,
    length: int,
) -> web.StreamResponse:
    """Body from `open_range` (the only read a remote store has); Range goes to the backend."""
    chunks = store.open_range(key, start, length)
    try:
        # Open before sending headers so an object removed since stat() is still a clean 404.
        first = await anext(chunks, b"")
    except ObjectNotFound:
        raise ApiError(NOT_FOUND, "no such object") from None
    sent = 0
    try:
        await resp.prepare(request)
        chunk = first
        while chunk:
            await resp.write(chunk)
            sent += len(chunk)
            chunk = await anext(chunks, b"")
        if sent != length:
            log.warning("%s: %d of %d bytes from the store; connection aborted", key, sent, length)
            abort(request)
            return resp
        await resp.write_eof()
    except ConnectionError:
        abort(request)  # the client left: routine, not an error
    except Exception as e:
        # Headers are out, so no error response is possible; cut the body short instead.
        if not resp.prepared:
            raise
        log.warning("%s: store read failed mid-body (%r); connection aborted", key, e)
        abort(request)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # async generators hold a response
        metrics.BYTES_SENT.labels(TIER).inc(sent)
    return resp


def make_app(
    settings: Settings, store: ObjectStore | None = None, *, control_url: str | None = None
) -> web.Application:
    """The origin's aiohttp app over `store`, by default `make_store(settings)` (filesystem
    under `settings.store_dir`, or S3 when `settings.s3_bucket` is set), closed on cleanup.
    With `control_url` it follows the purge log and refuses taken-down videos."""
    app = base_app(TIER)
    if settings.tier_secret:
        install_tier_guard(app, TierAuth(settings.tier_secret))
    app[STORE_KEY] = store if store is not None else make_store(settings)
    guard = app[GUARD_KEY] = Guard()
    if control_url:
        node = f"{TIER}@{settings.host}:{settings.port(TIER)}/{os.getpid()}"

        async def apply(p: Purge) -> None:
            guard.apply(p)

        feed = guard.feed = PurgeFeed(
            control_url, node, TIER, apply, state_path=None, ack_filter=is_takedown_entry,
            credential=settings.node_credential,
        )  # fmt: skip

        async def follow(_app: web.Application) -> AsyncIterator[None]:
            session = aiohttp.ClientSession()
            await feed.start(session)
            caught_up = asyncio.create_task(_announce(guard, feed))
            yield
            caught_up.cancel()
            await feed.close()
            await session.close()

        app.cleanup_ctx.append(follow)

    async def close(app: web.Application) -> None:
        await close_store(app[STORE_KEY])

    app.on_cleanup.append(close)
    # Catch-all after /healthz and /metrics: the raw path is validated in the handler, so no
    # router decoding step can turn %2f or %2e%2e into something else first. HEAD is implied.
    app.router.add_get("/{tail:.*}", serve_media)
    return app


async def _announce(guard: Guard, feed: PurgeFeed) -> None:
    await feed.wait_caught_up()
    counts = guard.takedowns.counts()
    log.info(
        "purge log replayed up to seq %d: refusing %d blocked and %d deleted video(s)",
        feed.applied, counts["blocked"], counts["deleted"],
    )  # fmt: skip
