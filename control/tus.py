"""tus 1.0.0 endpoint at /v1/tus/ (https://tus.io/protocols/resumable-upload): OPTIONS
discovery (§6), creation by POST with `Upload-Length`/`Upload-Metadata` (§7.1) so stock clients
(Uppy, tus-js-client, tuspy) need only the endpoint, creation-with-upload (§7.2), HEAD and PATCH
on an upload resource /v1/tus/{uploadSessionId} (§6), `Upload-Checksum` per PATCH (§7.4),
`Upload-Expires` (§7.3), and DELETE for termination (§7.5).

Protocol checks are in `tus_protocol`, storage and its concurrency rules in `Uploads`. Every
response, errors included, carries `Tus-Resumable` and `Cache-Control: no-store`; errors are the
usual JSON `{error: {code, message}}`. Statuses: 400 malformed header or unsupported checksum
algorithm, 403 another creator's upload, 404 unknown/terminated/cleaned-up upload, 409 offset
mismatch or a PATCH racing another, 410 expired, 412 wrong `Tus-Resumable`, 413 too large or
`quota_exceeded` (the key's storage quota), 415 wrong PATCH `Content-Type`, 429
`too_many_uploads` (the key's open uploads), 460 checksum mismatch, 507
`insufficient_storage` (no room for the declared length or a PATCH's Content-Length, or the
disk filled during a PATCH: its `Upload-Offset` is where to resume). Creation's refusals
(413/429/507) come before a byte of a creation-with-upload body is read
(`control/quotas.py`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import StreamReader, web

from control import tus_protocol as tp
from control.auth import authenticate
from control.ids import is_id
from control.uploads import Uploads
from control.validation import upload_request
from vodcore.config import Settings
from vodcore.errors import BAD_REQUEST, NOT_FOUND, VALIDATION, ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _tus_headers() -> dict[str, str]:
    return {"Tus-Resumable": tp.TUS_VERSION, "Cache-Control": "no-store"}


async def body_chunks(content: StreamReader) -> AsyncIterator[bytes]:
    """The body as the buffers it arrived in: `readchunk` hands each one over as it is, where
    `readany` / `iter_any` first join whatever is buffered (a copy of every byte: a quarter
    of control's CPU in a 1 GiB upload, py-spy)."""
    async for data, _end_of_http_chunk in content.iter_chunks():
        yield data


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


def upload_url(settings: Settings, request: web.Request, session_id: str) -> str:
    """Absolute URL of an upload resource: under `public_control_url` when configured, else
    the address the connection reached (the socket's own, as a literal). Never from `Host`,
    which the client chooses: a poisoned Location would send a resuming client's bytes
    elsewhere."""
    path = f"/v1/tus/{session_id}"
    if settings.public_control_url:
        return settings.public_control_url.rstrip("/") + path
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if not sock:
        return settings.control_url + path
    host, port = sock[0], sock[1]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def _session_id(request: web.Request) -> str:
    sid = request.match_info["sid"]
    if not is_id(sid, "us"):
        raise ApiError(NOT_FOUND, "no such upload session")
    return sid


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
        r.add_delete("/v1/tus/{sid}", tus_handler(self.delete))
        r.add_post("/v1/tus/{sid}", tus_handler(self.overridden))

    async def options(self, _request: web.Request) -> web.Response:
        return web.Response(
            status=204,
            headers={
                "Tus-Version": tp.TUS_VERSION,
                "Tus-Extension": tp.TUS_EXTENSIONS,
                "Tus-Max-Size": str(self.uploads.settings.max_upload_bytes),
                "Tus-Checksum-Algorithm": ",".join(tp.CHECKSUM_ALGORITHMS),
            },
        )

    async def create(self, request: web.Request) -> web.Response:
        tp.check_version(request.headers)
        principal = await authenticate(self.uploads.engine, request)
        s = self.uploads.settings
        if "Upload-Concat" in request.headers:
            raise ApiError(BAD_REQUEST, "concatenation is not supported (see Tus-Extension)")
        length = tp.parse_length(request.headers.get("Upload-Length"), s.max_upload_bytes)
        if length == 0:
            raise ApiError(VALIDATION, "Upload-Length must be positive for a video")
        meta = tp.parse_metadata(request.headers.get("Upload-Metadata"))
        # creation-with-upload (§7.2): the POST may carry the first bytes, checked like a PATCH
        # before anything is created, so a refused request leaves nothing behind
        with_upload = request.body_exists and request.content_type == tp.OFFSET_CONTENT_TYPE
        checksum = tp.parse_checksum(request.headers.get("Upload-Checksum"))
        if with_upload:
            tp.check_fits(0, request.content_length, length)
        title = (meta.get("title") or meta.get("filename") or "").strip()[:300] or "untitled"
        req = upload_request(
            {
                "title": title,
                "description": meta.get("description", "")[:5000],
                "visibility": meta.get("visibility", "public"),
                "contentType": meta.get("filetype") or meta.get("contentType"),
                "sizeBytes": length,
            },
            s.max_upload_bytes,
        )
        now = time.time()
        created = await self.uploads.create(req, principal.key_id, now, meta)
        offset = 0
        if with_upload:
            # The resource exists now: if its first bytes are refused (checksum, a cut), the
            # client still gets its Location and resumes from the offset answered here.
            with contextlib.suppress(ApiError):
                patched = await self.uploads.patch(
                    created.session_id,
                    0,
                    body_chunks(request.content),
                    now=now,
                    content_length=request.content_length,
                    checksum=checksum,
                    principal=principal,
                )
                offset = patched.offset
            if offset == 0:
                offset = (await self.uploads.session(created.session_id, time.time())).offset
        return web.Response(
            status=201,
            headers={
                "Location": upload_url(self.uploads.settings, request, created.session_id),
                "Upload-Offset": str(offset),
                "Upload-Expires": tp.http_date(created.expires_at),
                "X-Video-Id": created.video_id,
            },
        )

    async def head(self, request: web.Request) -> web.Response:
        tp.check_version(request.headers)
        principal = await authenticate(self.uploads.engine, request)
        s = await self.uploads.session(_session_id(request), time.time(), principal)
        s = await self.uploads.after_writer(s)  # a dying PATCH commits first (uploads rule 3)
        headers = {
            "Upload-Offset": str(await self.uploads.settled_offset(s)),
            "Upload-Length": str(s.size_bytes),
        }
        if s.is_open:
            headers["Upload-Expires"] = tp.http_date(s.expires_at)
        if s.metadata:
            headers["Upload-Metadata"] = tp.encode_metadata(s.metadata)
        return web.Response(status=200, headers=headers)

    async def patch(self, request: web.Request) -> web.Response:
        tp.check_version(request.headers)
        principal = await authenticate(self.uploads.engine, request)
        sid = _session_id(request)
        tp.check_content_type(request.headers)
        offset = tp.parse_offset(request.headers.get("Upload-Offset"))
        checksum = tp.parse_checksum(request.headers.get("Upload-Checksum"))
        patched = await self.uploads.patch(
            sid,
            offset,
            body_chunks(request.content),
            now=time.time(),
            content_length=request.content_length,
            checksum=checksum,
            principal=principal,
        )
        headers = {"Upload-Offset": str(patched.offset)}
        if not patched.completed:
            headers["Upload-Expires"] = tp.http_date(patched.expires_at)
        return web.Response(status=204, headers=headers)

    async def delete(self, request: web.Request) -> web.Response:
        tp.check_version(request.headers)
        principal = await authenticate(self.uploads.engine, request)
        await self.uploads.terminate(_session_id(request), principal, time.time())
        return web.Response(status=204)

    async def overridden(self, request: web.Request) -> web.StreamResponse:
        """POST + X-HTTP-Method-Override (§6), for clients that cannot send PATCH/DELETE."""
        if tp.method_override(request.headers) == "PATCH":
            return await self.patch(request)
        return await self.delete(request)
