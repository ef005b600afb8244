"""The origin tier: serves encoded media from the object store.

`GET`/`HEAD /v/{videoId}/{rest…}` reads object `media/{videoId}/{rest…}`. The raw path is
validated before anything touches the store (traversal, encoded separators, NUL → 400). Answers
carry ETag (the store's strong validator), Last-Modified, Accept-Ranges, the Cache-Control from
`origin.policy`, and `Surrogate-Key: {videoId}` so purges can find every object of a video.
Conditional and Range requests are decided by `vodcore.cache.conditional` (RFC 9110 §13, §14),
the same code the caches use. The origin is not a cache and sets no X-Cache.

Bodies stream through `ObjectStore.open_range`, which works for every backend; a sendfile fast
path for the filesystem store is left for later.
"""

from __future__ import annotations

from email.utils import formatdate

from aiohttp import web

from origin import policy
from vodcore import metrics
from vodcore.cache import conditional
from vodcore.cache.policy import fold_headers
from vodcore.config import Settings
from vodcore.errors import NOT_FOUND, RANGE_NOT_SATISFIABLE, ApiError
from vodcore.server import base_app, media_segments
from vodcore.store import ObjectNotFound, ObjectStore
from vodcore.store.fs import FilesystemStore

TIER = "origin"
STORE_KEY: web.AppKey[ObjectStore] = web.AppKey("store", ObjectStore)


def object_key(raw_path: str) -> tuple[str, str, list[str]]:
    """(object key, video id, segments after the video id) for a raw request path."""
    segs = media_segments(raw_path, 3)
    vid, rest = segs[1], segs[2:]
    return "/".join(["media", vid, *rest]), vid, rest


async def serve_media(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE_KEY]
    key, vid, rest = object_key(request.raw_path)
    try:
        info = await store.stat(key)
    except ObjectNotFound:
        raise ApiError(NOT_FOUND, "no such object") from None
    headers = {
        "ETag": info.etag,
        "Last-Modified": formatdate(info.mtime, usegmt=True),  # RFC 9110 §8.8.2
        "Cache-Control": policy.cache_control(rest),
        "Surrogate-Key": vid,
        "Accept-Ranges": "bytes",  # RFC 9110 §14.3
    }
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
            return web.Response(status=304, headers=headers)
        case conditional.Outcome.UNSATISFIABLE:
            raise ApiError(RANGE_NOT_SATISFIABLE, headers={"Content-Range": f"bytes */{info.size}"})
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
    chunks = store.open_range(key, start, length)
    try:
        # Open before sending headers so a file removed since stat() is still a clean 404.
        first = await anext(chunks, b"")
    except ObjectNotFound:
        raise ApiError(NOT_FOUND, "no such object") from None
    await resp.prepare(request)
    sent = 0
    try:
        chunk = first
        while chunk:
            await resp.write(chunk)
            sent += len(chunk)
            chunk = await anext(chunks, b"")
    finally:
        aclose = getattr(chunks, "aclose", None)  # async generators hold an open file
        if aclose is not None:
            await aclose()
        metrics.BYTES_SENT.labels(TIER).inc(sent)
    if sent != length:
        # The object shrank under us: cut the connection rather than end a short body cleanly.
        raise ConnectionResetError("object changed while being sent")
    await resp.write_eof()
    return resp


def make_app(settings: Settings) -> web.Application:
    """The origin's aiohttp app over a FilesystemStore at `settings.store_dir`."""
    app = base_app(TIER)
    app[STORE_KEY] = FilesystemStore(settings.store_dir)
    # Catch-all after /healthz and /metrics: the raw path is validated in the handler, so no
    # router decoding step can turn %2f or %2e%2e into something else first. HEAD is implied.
    app.router.add_get("/{tail:.*}", serve_media)
    return app
