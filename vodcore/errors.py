"""The one catalogue of errors a client can see.

Every error a vodstack tier returns is one named `ErrorKind` with a stable code, a default
message and an HTTP status (tusd's error.go is the model). Domain code raises `ApiError`; the
`error_middleware` turns it into `{"error": {"code", "message"}}` JSON. Anything else that escapes
a handler becomes a 500 in exactly one place, logged with its traceback and never shown.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("vod.errors")


@dataclass(frozen=True, slots=True)
class ErrorKind:
    code: str
    status: int
    message: str


# fmt: off
BAD_REQUEST          = ErrorKind("bad_request", 400, "the request is malformed")
BAD_JSON             = ErrorKind("bad_json", 400, "the body is not valid JSON")
VALIDATION           = ErrorKind("validation_failed", 422, "a field is missing or invalid")
BAD_PATH             = ErrorKind("bad_path", 400, "the path is not allowed")
UNAUTHENTICATED      = ErrorKind("unauthenticated", 401, "an API key is required")
FORBIDDEN            = ErrorKind("forbidden", 403, "not allowed")
BAD_TOKEN            = ErrorKind("bad_token", 403, "the playback token is invalid or expired")
NOT_FOUND            = ErrorKind("not_found", 404, "no such resource")
METHOD_NOT_ALLOWED   = ErrorKind("method_not_allowed", 405, "method not allowed")
NOT_READY            = ErrorKind("not_ready", 409, "the video is not ready for playback")
OFFSET_MISMATCH      = ErrorKind("offset_mismatch", 409, "Upload-Offset is not the stored offset")
UPLOAD_STATE         = ErrorKind("upload_state", 409, "the upload does not allow this now")
VIDEO_STATE          = ErrorKind("video_state", 409, "the video's state does not allow this")
GONE                 = ErrorKind("gone", 410, "the resource was deleted")
PRECONDITION         = ErrorKind("precondition_failed", 412, "unsupported protocol version")
TOO_LARGE            = ErrorKind("too_large", 413, "the body exceeds the declared or allowed size")
QUOTA_EXCEEDED       = ErrorKind("quota_exceeded", 413, "the upload exceeds the storage quota")
TOO_MANY_UPLOADS     = ErrorKind("too_many_uploads", 429, "too many open upload sessions")
INSUFFICIENT_STORAGE = ErrorKind("insufficient_storage", 507, "not enough storage space left")
REQUEST_TIMEOUT      = ErrorKind("request_timeout", 408, "the request was not received in time")
BAD_HEADER           = ErrorKind("bad_header", 400, "a request header is malformed")
UNSUPPORTED_MEDIA    = ErrorKind("unsupported_media_type", 415, "unsupported Content-Type")
RANGE_NOT_SATISFIABLE = ErrorKind("range_not_satisfiable", 416, "the range is outside the object")
BLOCKED              = ErrorKind("blocked", 451, "the video is unavailable for legal reasons")
RATE_LIMITED         = ErrorKind("rate_limited", 429, "too many requests; slow down")
CHECKSUM_MISMATCH    = ErrorKind("checksum_mismatch", 460, "the body fails its Upload-Checksum")
UPSTREAM_FAILED      = ErrorKind("upstream_failed", 502, "the upstream tier failed")
UPSTREAM_TIMEOUT     = ErrorKind("upstream_timeout", 504, "the upstream tier timed out")
UNAVAILABLE          = ErrorKind("unavailable", 503, "the service is not ready")
INTERNAL             = ErrorKind("internal", 500, "internal error")
# fmt: on


class ApiError(Exception):
    """A client-visible error: one catalogue entry plus an optional specific message."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message or kind.message)
        self.kind = kind
        self.message = message or kind.message
        self.headers = headers or {}
        self.extra = extra or {}


def error_body(kind: ErrorKind, message: str | None = None, **extra: Any) -> bytes:
    err: dict[str, Any] = {"code": kind.code, "message": message or kind.message}
    err.update(extra)
    return orjson.dumps({"error": err})


def error_response(err: ApiError) -> web.Response:
    headers = {"Cache-Control": "no-store", **err.headers}
    return web.Response(
        status=err.kind.status,
        body=error_body(err.kind, err.message, **err.extra),
        content_type="application/json",
        headers=headers,
    )


_HTTP_KIND = {
    400: BAD_REQUEST,
    401: UNAUTHENTICATED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    408: REQUEST_TIMEOUT,
    413: TOO_LARGE,
    415: UNSUPPORTED_MEDIA,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:
        # aiohttp's own 404/405/413 (router, client_max_size): keep status, give JSON.
        if e.status < 400:
            raise
        kind = _HTTP_KIND.get(e.status, ErrorKind("http_error", e.status, e.reason))
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow",)}
        return error_response(ApiError(kind, e.reason, headers=headers))
    except (ConnectionResetError, TimeoutError):
        raise
    except Exception:
        # The one place the unknown becomes a 500 (STYLE.md habit 6).
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(INTERNAL))
