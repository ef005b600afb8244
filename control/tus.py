"""tus 1.0.0 endpoint at /v1/tus/: OPTIONS discovery, creation (+ creation-with-upload), HEAD
and PATCH on an upload resource /v1/tus/{uploadSessionId}. Protocol checks are in
`tus_protocol`; storage is `Uploads`. Every response, errors included, carries
`Tus-Resumable` (tus §Tus-Resumable)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate

from aiohttp import web

from control import tus_protocol as tp
from control.auth import authenticate
from control.uploads import Uploads
from control.validation import UploadRequest
from vodcore.errors import VALIDATION, ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = 256 * 1024


def _tus_headers() -> dict[str, str]:
    return {"Tus-Resumable": tp.TUS_VERSION, "Cache-Control": "no-store"}


def tus_handler(fn: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            resp = await fn(request)
        except ApiError as e:
            e.headers = {**_tus_headers(), **e.headers}
            raise
        resp.headers.update(_tus_headers())
        return resp

    return wrapped


def upload_url(request: web.Request, session_id: str) -> str:
    """Absolute URL of an upload resource, as the client reached us (Host header)."""
    return str(request.url.with_path(f"/v1/tus/{session_id}").with_query(None))


def _expires_header(ts: float) -> str:
    return formatdate(ts, usegmt=True)  # RFC 9110 §5.6.7 IMF-fixdate


class TusEndpoint:
    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_route("OPTIONS", "/v1/tus/", tus_handler(self.options))
        r.add_route("OPTIONS", "/v1/tus/{sid}", tus_handler(self.options))
        r.add_post("/v1/tus/", tus_handler(self.create))
        r.add_route("HEAD", "/v1/tus/{sid}", tus_handler(self.head))
        r.add_patch("/v1/tus/{sid}", tus_handler(self.patch))

    async def options(self, _request: web.Request) -> web.Response:
        s = self.uploads.settings
        return web.Response(
            status=204,
            headers={
                "Tus-Version": tp.TUS_VERSION,
                "Tus-Extension": tp.TUS_EXTENSIONS,
                "Tus-Max-Size": str(s.max_upload_bytes),
            },
        )

    async def create(self, request: web.Request) -> web.Response:
        tp.check_version(request.headers)
        principal = await authenticate(self.uploads.engine, request)
        s = self.uploads.settings
        length = tp.parse_length(request.headers.get("Upload-Length"), s.max_upload_bytes)
        if length == 0:
            raise ApiError(VALIDATION, "Upload-Length must be positive for a video")
        meta = tp.parse_metadata(request.headers.get("Upload-Metadata"))
        title = (meta.get("title") or meta.get("filename") or "untitled")[:300]
        visibility = meta.get("visibility", "public")
        if visibility not in ("public", "unlisted", "private"):
            raise ApiError(VALIDATION, "visibility: must be public, unlisted or private")
        req = UploadRequest(
            title=title,
            description=meta.get("description", "")[:5000],
            visibility=visibility,
            content_type=meta.get("filetype") or meta.get("contentType"),
            size_bytes=length,
        )
        now = time.time()
        created = await self.uploads.create(req, principal.key_id, now, meta)
        offset = 0
        # creation-with-upload: the POST may carry the first bytes (tus §Creation With Upload)
        if request.body_exists and request.content_type == tp.OFFSET_CONTENT_TYPE:
            async with self.uploads.lock(created.session_id):
                offset, _ = await self.uploads.append(
                    created.session_id, 0, request.content.iter_chunked(CHUNK), now
                )
        loc = upload_url(request, created.session_id)
        return web.Response(
            status=201,
            headers={
                "Location": loc,
                "Upload-Offset": str(offset),
                "Upload-Expires": _expires_header(created.expires_at),
                "X-Video-Id": created.video_id,
            },
        )

    async def head(self, request: web.Request) -> web.Response:
        tp.check_version(request.headers)
        await authenticate(self.uploads.engine, request)
        s = await self.uploads.session(request.match_info["sid"], time.time())
        return web.Response(
            status=200,
            headers={
                "Upload-Offset": str(s["offset"]),
                "Upload-Length": str(s["size_bytes"]),
                "Upload-Expires": _expires_header(float(s["expires_at"])),
            },
        )

    async def patch(self, request: web.Request) -> web.Response:
        tp.check_version(request.headers)
        await authenticate(self.uploads.engine, request)
        sid = request.match_info["sid"]
        now = time.time()
        async with self.uploads.lock(sid):
            s = await self.uploads.session(sid, now)
            offset = tp.check_patch(request.headers, int(s["offset"]))
            new_offset, _ = await self.uploads.append(
                sid, offset, request.content.iter_chunked(CHUNK), now
            )
        return web.Response(
            status=204,
            headers={
                "Upload-Offset": str(new_offset),
                "Upload-Expires": _expires_header(float(s["expires_at"])),
            },
        )
