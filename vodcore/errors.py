"""The one catalogue of errors a client can see.

Every error a vodstack tier returns is one named `ErrorKind` with a stable code, a default
message and an HTTP status (tusd's error.go is the model). Domain code raises `ApiError`; the
`error_middleware` turns it into `{"error": {"code", "message"}}` JSON. Anything else that escapes
a handler becomes a 500 in exactly one place, logged with its traceback and never shown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

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
URI_TOO_LONG         = ErrorKind("uri_too_long", 414, "the request target is too long")
HEADERS_TOO_LARGE    = ErrorKind("headers_too_large", 431, "request header fields too large")
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
    except DISCONNECTS:
        raise  # the client went away: nothing to answer (vodcore/server.py keeps it quiet)
    except TimeoutError:
        if client_gone(request):
            raise
        return error_response(ApiError(UPSTREAM_TIMEOUT))
    except Exception:
        if client_gone(request):
            # Whatever a handler trips over once its client has closed the connection
            # (a payload error mid-body, a write to a closing transport) is not our fault.
            raise
        # The one place the unknown becomes a 500 (STYLE.md habit 6).
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(INTERNAL))


# What a handler raises when its client disconnects: reset, broken pipe (a sendfile to a
# closed socket), aborted; aiohttp's ClientConnectionResetError (a write to a closing
# transport) is a ConnectionResetError. ConnectionRefusedError is not here: that is an
# upstream's, and a 5xx. aiohttp's client wraps its own socket errors in ClientOSError, so a
# bare one of these escaping a handler comes from the client's socket.
DISCONNECTS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)

# Status counted and logged for a request whose client left before its answer (nginx's 499).
CLIENT_CLOSED = 499


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def is_disconnect(request: web.BaseRequest, exc: BaseException | None) -> bool:
    """Whether `exc`, escaping the handler of `request`, means its client went away."""
    return isinstance(exc, (*DISCONNECTS, asyncio.CancelledError)) or client_gone(request)


def head_error_kind(exc: HttpProcessingError) -> tuple[ErrorKind, str]:
    """The catalogue entry and message for a request head aiohttp's parser refused.

    RFC 9112 §3: a request-target longer than the server parses is 414; RFC 6585 §5: header
    fields too large (one too long, or too many) are 431; any other malformed field (bad
    name or value characters, obs-fold, NUL, an invalid or duplicate Content-Length, RFC 9112
    §6.3) is 400 `bad_header`; the rest (request line, method, version) 400 `bad_request`.
    """
    if isinstance(exc, LineTooLong):
        # aiohttp reports the start of the line that overflowed; only a request-target
        # starts with "/" (a header value rarely does: then 414 instead of 431, still 4xx).
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray) and line[:1] == b"/":
            return URI_TOO_LONG, URI_TOO_LONG.message
        return HEADERS_TOO_LARGE, HEADERS_TOO_LARGE.message
    text = str(exc.message or "")
    reason = text.split(":", 1)[0].splitlines()[0][:100] if text else ""
    if not reason.isprintable() or not reason.isascii():
        reason = ""
    low = text.lower()
    if "too many headers" in low:
        return HEADERS_TOO_LARGE, HEADERS_TOO_LARGE.message
    if "header" in low or "content-length" in low or "transfer-encoding" in low:
        return BAD_HEADER, f"{BAD_HEADER.message}: {reason}" if reason else BAD_HEADER.message
    return BAD_REQUEST, f"{BAD_REQUEST.message}: {reason}" if reason else BAD_REQUEST.message
