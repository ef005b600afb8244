"""`GET /v1/openapi.json`: an OpenAPI 3.1 description of the control API, built in code.

Rules:
- the document names every route `control.app.make_app` registers (the /v1 API, `/healthz`
  and `/metrics`); `tests/integration/test_openapi.py` walks `app.router` and fails for a route
  that is not here, and runs schemathesis against the live document (no 5xx, every response as
  documented: status, content type, headers, body schema);
- request bodies are JSON Schemas; `additionalProperties: false` only where the handler refuses
  unknown fields (video PATCH, playback events, comments), elsewhere unknown fields are ignored
  and the schema says so by leaving them open;
- security: two schemes, both bearer tokens: the API key (`Authorization: Bearer vod_…`) and,
  for the node endpoints (purge stream, acks, cutoffs: `control.nodeauth.NODE_PATHS`), a node
  credential (`nodeCredential`, `Bearer vodn_…`). An operation lists `[{apiKey: []}]` when a
  key is required, `[{}, {apiKey: []}]` when one is optional (it may see more: a private video
  for its owner) and `[]` when none is read; operator-only calls say so in `x-vod-roles`;
- every error is `{error: {code, message, …}}` (`vodcore.errors`), listed per operation with
  the statuses its handler can answer; 429 (`Retry-After`) on every call the rate limiter does
  not exempt (`control.ratelimit.EXEMPT_PATHS`); 408 on every call (a request head or body
  that does not arrive in time, issue 11), and 400/414/431 for a malformed or oversized head
  (answered before any handler); uploads add 413 `quota_exceeded`, 429 `too_many_uploads` and
  507 `insufficient_storage`;
- tus (`/v1/tus/…`): methods (OPTIONS, POST, HEAD, PATCH, DELETE and POST with
  `X-HTTP-Method-Override`) with their request and response headers as far as OpenAPI can say
  them; bodies are `application/offset+octet-stream`. HEAD answers carry no body;
- `/v1/purges/stream` is `text/event-stream` (it does not end: nodes follow it);
- served as JSON with `Cache-Control: no-cache`, built once per app (`max_upload_bytes` comes
  from the settings).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from control import tus_protocol as tp
from control.engagement import EVENT_TYPES
from control.listing import MAX_CURSOR as ME_MAX_CURSOR
from control.listing import MAX_LIMIT as ME_MAX_LIMIT
from control.playback_sessions import SESSION_ID_CHARS
from control.purges import TIERS
from control.ratelimit import EXEMPT_PATHS
from control.search import MAX_LIMIT as SEARCH_MAX_LIMIT
from control.search import MAX_QUERY_CHARS
from control.validation import MAX_DESCRIPTION, MAX_TITLE, VISIBILITIES
from vodcore.errors import (
    BAD_HEADER,
    BAD_JSON,
    BAD_REQUEST,
    BLOCKED,
    CHECKSUM_MISMATCH,
    FORBIDDEN,
    GONE,
    HEADERS_TOO_LARGE,
    INSUFFICIENT_STORAGE,
    NOT_FOUND,
    PRECONDITION,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    REQUEST_TIMEOUT,
    TOO_LARGE,
    TOO_MANY_UPLOADS,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNSUPPORTED_MEDIA,
    URI_TOO_LONG,
    VALIDATION,
    ErrorKind,
)
from vodcore.lifecycle import State

PATH = "/v1/openapi.json"
JSON = "application/json"
Schema = dict[str, Any]

# ids: a prefix and 16 lowercase base32 characters (`control.ids`)
VIDEO_ID = r"^vid_[a-z2-7]{16}$"
SESSION_ID = r"^us_[a-z2-7]{16}$"
COMMENT_ID = r"^cmt_[a-z2-7]{16}$"
PURGE_ID = r"^pg_[a-z2-7]{16}$"
API_KEY_ID = r"^key_[a-z2-7]{16}$"

_STATUS_TEXT: dict[int, str] = {
    400: "Malformed request (bad JSON, a bad header, cursor or limit).",
    401: "An API key (node endpoints: a node credential) is required, or it is unknown or revoked.",
    403: "The key may not do this (role or ownership); a node credential that is revoked or "
    "for another tier.",
    404: "No such resource (also: a private video, to anyone but its owner or an operator).",
    408: "The request head or body did not arrive in time.",
    409: "The resource's state does not allow this now (`state` says which).",
    410: "The resource was deleted (a video: `state`) or the upload expired.",
    412: "`Tus-Resumable` is missing or not 1.0.0.",
    413: "The body, or the declared size, is too large, or beyond the key's storage quota.",
    414: "The request target is too long.",
    415: "Unsupported Content-Type.",
    422: "A field is missing or invalid (`field` names it).",
    429: "Rate limited, or too many open upload sessions: retry after `Retry-After` seconds.",
    431: "The request's header fields are too large.",
    451: "The video is blocked (taken down for legal reasons).",
    460: "The body does not match `Upload-Checksum`; nothing of it was kept.",
    503: "Temporarily unavailable.",
    507: "Not enough storage space left on the server.",
}
_KINDS: dict[int, tuple[ErrorKind, ...]] = {
    400: (BAD_REQUEST, BAD_JSON, BAD_HEADER),
    401: (UNAUTHENTICATED,),
    403: (FORBIDDEN,),
    404: (NOT_FOUND,),
    408: (REQUEST_TIMEOUT,),
    409: (),
    410: (GONE,),
    412: (PRECONDITION,),
    413: (TOO_LARGE, QUOTA_EXCEEDED),
    414: (URI_TOO_LONG,),
    415: (UNSUPPORTED_MEDIA,),
    422: (VALIDATION,),
    429: (RATE_LIMITED, TOO_MANY_UPLOADS),
    431: (HEADERS_TOO_LARGE,),
    451: (BLOCKED,),
    460: (CHECKSUM_MISMATCH,),
    503: (UNAVAILABLE,),
    507: (INSUFFICIENT_STORAGE,),
}


def _nullable(schema: Schema) -> Schema:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(props: dict[str, Schema], required: Iterable[str] = (), *, closed: bool = False) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    req = list(required)
    if req:
        out["required"] = req
    if closed:
        out["additionalProperties"] = False
    return out


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> Schema:
    out: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _header(schema: Schema, description: str, *, required: bool = False) -> Schema:
    return {"schema": schema, "description": description, "required": required}


_INT_HEADER: Schema = {"type": "string", "pattern": r"^[0-9]+$"}


def _errors(*statuses: int, body: bool = True) -> dict[str, Any]:
    """References to the shared error responses (`E{status}`, or `H{status}` without a body,
    for HEAD)."""
    prefix = "E" if body else "H"
    return {str(s): {"$ref": f"#/components/responses/{prefix}{s}"} for s in statuses}


def _error_responses() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, text in _STATUS_TEXT.items():
        codes = ", ".join(f"`{k.code}`" for k in _KINDS[status])
        desc = f"{text} Codes: {codes}." if codes else text
        headers: dict[str, Any] = {}
        if status == 429:
            headers["Retry-After"] = _header(
                _INT_HEADER, "Whole seconds until a request is allowed again."
            )
        if status == 401:
            headers["WWW-Authenticate"] = _header({"type": "string"}, "Bearer challenge.")
        out[f"E{status}"] = _json(_ref("Error"), desc, headers)
        bare: Schema = {"description": f"{desc} (HEAD: headers only.)"}
        if headers:
            bare["headers"] = headers
        out[f"H{status}"] = bare
    return out


def _schemas(max_upload_bytes: int) -> dict[str, Schema]:
    string: Schema = {"type": "string"}
    integer: Schema = {"type": "integer"}
    number: Schema = {"type": "number"}
    video_id: Schema = {"type": "string", "pattern": VIDEO_ID}
    # a title: 1..MAX_TITLE characters with something besides whitespace, no NUL
    title: Schema = {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_TITLE,
        "pattern": r"^[^\x00]*[^\s\x00][^\x00]*$",
    }
    description: Schema = {"type": "string", "maxLength": MAX_DESCRIPTION, "pattern": r"^[^\x00]*$"}
    visibility: Schema = {"type": "string", "enum": list(VISIBILITIES)}
    event_id: Schema = {"type": "string", "pattern": r"^[A-Za-z0-9._:-]{1,128}$"}
    event: Schema = _obj(
        {
            "eventId": {
                **event_id,
                "description": "Makes a retried event harmless; when absent, one is made of "
                "the event's fields.",
            },
            "videoId": video_id,
            "sessionId": {
                **event_id,
                "description": "The `sessionId` of a `GET /v1/videos/{id}/playback` answer for "
                "this video. Events with any other id are answered but not stored (`rejected`) "
                "and never count a view.",
            },
            "eventType": {"type": "string", "enum": sorted(EVENT_TYPES)},
            "positionSeconds": {"type": "number", "minimum": 0, "maximum": 7 * 86400},
            "occurredAt": {
                "description": "ISO 8601 (UTC unless it says otherwise) or epoch seconds "
                "(above 1e11: milliseconds).",
                "anyOf": [
                    {"type": "string", "format": "date-time"},
                    {"type": "number", "exclusiveMinimum": 0, "maximum": 1e10},
                ],
            },
        },
        ["videoId", "sessionId", "eventType", "positionSeconds", "occurredAt"],
        closed=True,
    )
    purge_ids: Schema = {
        "anyOf": [
            {"type": "string", "pattern": r"^[A-Za-z0-9_~.-]{1,80}$"},
            {
                "type": "array",
                "minItems": 1,
                "maxItems": 100,
                "items": {"type": "string", "pattern": r"^[A-Za-z0-9_~.-]{1,80}$"},
            },
        ]
    }
    purge_prefix: Schema = {"type": "string", "pattern": r"^/[^\x00]*$", "maxLength": 1024}
    soft: Schema = {"type": "boolean"}

    def target(name: str, schema: Schema) -> Schema:
        return _obj({name: schema, "soft": soft}, [name])

    purge_row: Schema = _obj(
        {
            "seq": integer,
            "purgeId": string,
            "kind": {"type": "string", "enum": ["video", "keys", "prefix", "all", "none"]},
            "targets": {"type": "array", "items": string},
            "soft": {"type": "boolean"},
            "action": string,
            "cutoff": _nullable(number),
        },
        ["seq", "purgeId", "kind", "targets", "soft"],
    )
    takedown: Schema = _obj(
        {
            "videoId": string,
            "state": {"type": "string", "enum": [s.value for s in State]},
            "purgeId": string,
            "seq": integer,
            "objectsMoved": integer,
        },
        ["videoId", "state", "purgeId", "seq"],
    )
    return {
        "Error": _obj(
            {
                "error": {
                    "type": "object",
                    "properties": {
                        "code": string,
                        "message": string,
                        "field": string,
                        "state": _nullable(string),
                    },
                    "required": ["code", "message"],
                }
            },
            ["error"],
        ),
        "UploadRequest": _obj(
            {
                "title": title,
                "description": description,
                "visibility": visibility,
                "contentType": _nullable({"type": "string", "maxLength": 100}),
                "sizeBytes": {"type": "integer", "minimum": 1, "maximum": max_upload_bytes},
            },
            ["title", "sizeBytes"],
        ),
        "UploadCreated": _obj(
            {
                "videoId": string,
                "uploadSessionId": string,
                "uploadUrl": {"type": "string", "format": "uri"},
                "partSizeBytes": integer,
                "expiresAt": {"type": "string", "format": "date-time"},
            },
            ["videoId", "uploadSessionId", "uploadUrl", "partSizeBytes", "expiresAt"],
        ),
        "UploadCompleted": _obj({"videoId": string, "state": string}, ["videoId", "state"]),
        "Video": _obj(
            {
                "videoId": string,
                "title": string,
                "description": string,
                "visibility": visibility,
                "state": {"type": "string", "enum": [s.value for s in State]},
                "failureReason": _nullable(string),
                "version": _nullable(integer),
                "durationSeconds": _nullable(number),
                "width": _nullable(integer),
                "height": _nullable(integer),
                "renditions": {"type": "array"},
                "progress": _nullable(number),
                "thumbnails": _nullable({"type": "object"}),
                "quality": _nullable({"type": "object"}),
                "sizeBytes": _nullable(integer),
                "createdAt": _nullable({"type": "string", "format": "date-time"}),
                "readyAt": _nullable({"type": "string", "format": "date-time"}),
                "viewCount": integer,
                "likeCount": integer,
            },
            ["videoId", "title", "description", "visibility", "state", "viewCount", "likeCount"],
        ),
        "VideoPatch": {
            **_obj(
                {"title": title, "description": description, "visibility": visibility}, closed=True
            ),
            "minProperties": 1,
        },
        "VideoPage": _obj(
            {"results": {"type": "array", "items": _ref("Video")}, "nextCursor": _nullable(string)},
            ["results", "nextCursor"],
        ),
        "Playback": _obj(
            {
                "videoId": string,
                "state": string,
                "manifestUrl": string,
                "dashUrl": string,
                "thumbnailUrl": string,
                "thumbnailsVttUrl": _nullable(string),
                "durationSeconds": _nullable(number),
                "expiresAt": {"type": "string", "format": "date-time"},
                "sessionId": {
                    "type": "string",
                    "minLength": SESSION_ID_CHARS,
                    "maxLength": SESSION_ID_CHARS,
                    "description": "This playback's session, for `POST /v1/playback-events` "
                    "(signed: bound to the video, valid 12 hours).",
                },
            },
            [
                "videoId",
                "state",
                "manifestUrl",
                "dashUrl",
                "thumbnailUrl",
                "expiresAt",
                "sessionId",
            ],
        ),
        "Jwks": _obj(
            {
                "keys": {
                    "type": "array",
                    "items": _obj(
                        {
                            "kty": string,
                            "crv": string,
                            "x": string,
                            "kid": string,
                            "alg": string,
                            "use": string,
                        },
                        ["kty", "crv", "x", "kid"],
                    ),
                }
            },
            ["keys"],
        ),
        "SearchPage": _obj(
            {
                "results": {
                    "type": "array",
                    "items": _obj(
                        {
                            "videoId": string,
                            "title": string,
                            "thumbnailUrl": _nullable(string),
                            "viewCount": integer,
                        },
                        ["videoId", "title", "thumbnailUrl", "viewCount"],
                    ),
                },
                "nextCursor": _nullable(string),
            },
            ["results", "nextCursor"],
        ),
        "PlaybackEvent": event,
        "PlaybackEvents": {
            "oneOf": [
                _ref("PlaybackEvent"),
                _obj(
                    {
                        "events": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1000,
                            "items": _ref("PlaybackEvent"),
                        }
                    },
                    ["events"],
                    closed=True,
                ),
            ]
        },
        "Accepted": _obj(
            {
                "accepted": {**integer, "description": "Events stored (they may count views)."},
                "rejected": {
                    **integer,
                    "description": "Events dropped: no session the playback API issued for "
                    "the video, or over the per-session or per-IP caps.",
                },
            },
            ["accepted", "rejected"],
        ),
        "ApiKey": _obj(
            {
                "keyId": string,
                "role": {"type": "string", "enum": ["creator", "operator"]},
                "createdAt": _nullable({"type": "string", "format": "date-time"}),
                "revokedAt": _nullable({"type": "string", "format": "date-time"}),
            },
            ["keyId", "role", "createdAt", "revokedAt"],
        ),
        "ApiKeys": _obj({"keys": {"type": "array", "items": _ref("ApiKey")}}, ["keys"]),
        "Like": _obj(
            {"videoId": string, "liked": {"type": "boolean"}, "likeCount": integer},
            ["videoId", "liked", "likeCount"],
        ),
        "CommentRequest": _obj(
            {
                "text": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 5000,
                    "pattern": r"^[^\x00]*[^\s\x00][^\x00]*$",
                }
            },
            ["text"],
            closed=True,
        ),
        "Comment": _obj(
            {
                "commentId": string,
                "videoId": string,
                "authorId": _nullable(string),
                "text": string,
                "createdAt": {"type": "string", "format": "date-time"},
            },
            ["commentId", "videoId", "text", "createdAt"],
        ),
        "CommentPage": _obj(
            {
                "comments": {"type": "array", "items": _ref("Comment")},
                "nextCursor": _nullable(string),
            },
            ["comments", "nextCursor"],
        ),
        "PurgeRequest": {
            "description": "Exactly one target: `videoId` (known videos), `surrogateKeys`, "
            "`prefix` (absolute paths) or `all: true`; `soft` marks stale instead of dropping.",
            "oneOf": [
                target("videoId", purge_ids),
                target("surrogateKeys", purge_ids),
                target(
                    "prefix",
                    {
                        "anyOf": [
                            purge_prefix,
                            {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 100,
                                "items": purge_prefix,
                            },
                        ]
                    },
                ),
                target("all", {"const": True}),
            ],
        },
        "PurgeCreated": _obj({"purgeId": string, "seq": integer}, ["purgeId", "seq"]),
        "PurgeStatus": {
            "allOf": [
                purge_row,
                _obj(
                    {
                        "createdAt": number,
                        "complete": {"type": "boolean"},
                        "nodes": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "node": string,
                                    "tier": string,
                                    "applied": {"type": "boolean"},
                                    "appliedAt": _nullable(number),
                                },
                                ["node", "tier", "applied", "appliedAt"],
                            ),
                        },
                    },
                    ["createdAt", "complete", "nodes"],
                ),
            ]
        },
        "PurgeAck": _obj(
            {
                "node": {"type": "string", "minLength": 1, "maxLength": 80},
                "tier": {"type": "string", "enum": list(TIERS)},
                "seqs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                },
            },
            ["node", "tier", "seqs"],
        ),
        "PurgeAcked": _obj({"node": string, "appliedSeq": integer}, ["node", "appliedSeq"]),
        "Reason": _obj({"reason": {"type": "string", "minLength": 1, "maxLength": 2000}}),
        "Takedown": takedown,
        "Cutoffs": {"type": "object", "additionalProperties": number},
        "CutoffsWithRefusals": _obj(
            {
                "cutoffs": {"type": "object", "additionalProperties": number},
                "refusals": {
                    "type": "object",
                    "additionalProperties": {"enum": ["blocked", "deleted"]},
                },
            },
            ["cutoffs", "refusals"],
        ),
        "Rotated": _obj(
            {"kid": string, "published": {"type": "array", "items": string}, "seq": integer},
            ["kid", "published", "seq"],
        ),
        "Revoked": _obj(
            {"revoked": string, "signing": string, "seq": integer}, ["revoked", "signing", "seq"]
        ),
        "Health": _obj(
            {"status": {"type": "string", "enum": ["ok", "starting"]}, "tier": string},
            ["status", "tier"],
        ),
    }


def _path_param(name: str, pattern: str | None, description: str) -> Schema:
    schema: Schema = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _query(name: str, schema: Schema, description: str, *, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


def _in_header(name: str, schema: Schema, description: str, *, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "schema": schema,
        "description": description,
    }


# aiohttp refuses a request line or a header over 8190 bytes (a plain-text 400 from its parser,
# before any handler): query and header values are documented short enough to fit, even with
# every character percent-encoded from 4 UTF-8 bytes.
HEADER_MAX = 4096
CURSOR = r"^[A-Za-z0-9_-]+$"  # cursors are unpadded base64url
REASON = _query(
    "reason",
    {"type": "string", "minLength": 1, "maxLength": 500},
    "The reason, when the body does not give it (a longer one, up to 2000 characters, goes in "
    "the body).",
)
VIDEO = _path_param("id", VIDEO_ID, "A video id.")
SESSION = _path_param("sid", SESSION_ID, "An upload session id (`uploadSessionId`).")
KEY_REQUIRED: list[dict[str, list[str]]] = [{"apiKey": []}]
KEY_OPTIONAL: list[dict[str, list[str]]] = [{}, {"apiKey": []}]
NODE: list[dict[str, list[str]]] = [{"nodeCredential": []}]
NO_KEY: list[dict[str, list[str]]] = []

_TUS_RESUMABLE = _in_header(
    "Tus-Resumable", {"type": "string", "enum": [tp.TUS_VERSION]}, "The tus version.", required=True
)
_CHECKSUM = _in_header(
    "Upload-Checksum",
    {"type": "string", "pattern": r"^(sha1|sha256|md5) [A-Za-z0-9+/]+=*$", "maxLength": 100},
    "`<algorithm> <base64 digest>` of this request's body (tus checksum extension).",
)
_TUS_HEADERS: dict[str, Any] = {
    "Tus-Resumable": _header({"type": "string"}, "Always 1.0.0.", required=True),
}
_OFFSET_BODY: Schema = {
    "required": False,
    "content": {tp.OFFSET_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
}


def _ok(status: int, schema: Schema | None, description: str, **extra: Any) -> dict[str, Any]:
    if schema is None:
        return {str(status): {"description": description, **extra}}
    return {str(status): {**_json(schema, description), **extra}}


def _op(
    summary: str,
    tag: str,
    responses: dict[str, Any],
    *,
    security: list[dict[str, list[str]]],
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    body_required: bool = True,
    limited: bool = True,
    operator: bool = False,
    raw_body: Schema | None = None,
) -> Schema:
    op: Schema = {"summary": summary, "tags": [tag], "security": security}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {JSON: {"schema": body}}}
    if raw_body is not None:
        op["requestBody"] = raw_body
    op["responses"] = {**responses, **_errors(408), **(_errors(429) if limited else {})}
    if operator:
        op["x-vod-roles"] = ["operator"]
    return op


def document(max_upload_bytes: int) -> dict[str, Any]:
    """The OpenAPI document of the control API."""

    def lim(path: str) -> bool:
        return path not in EXEMPT_PATHS

    tus_errors = (400, 401, 403, 404, 410, 412)
    paths: dict[str, dict[str, Any]] = {
        "/healthz": {
            "get": _op(
                "Readiness of this control process",
                "operations",
                {
                    **_ok(200, _ref("Health"), "Ready."),
                    **_ok(503, _ref("Health"), "Starting (the database is not ready)."),
                },
                security=NO_KEY,
                limited=False,
            ),
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                "operations",
                {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                security=NO_KEY,
                limited=False,
            ),
        },
        PATH: {
            "get": _op(
                "This document",
                "operations",
                _ok(200, {"type": "object"}, "The OpenAPI document."),
                security=NO_KEY,
                limited=lim(PATH),
            ),
        },
        "/v1/uploads": {
            "post": _op(
                "Create an upload (a video and its tus upload resource)",
                "uploads",
                {
                    **_ok(201, _ref("UploadCreated"), "Created; upload the bytes to `uploadUrl`."),
                    **_errors(400, 401, 413, 422, 429, 507),
                },
                security=KEY_REQUIRED,
                body=_ref("UploadRequest"),
            ),
        },
        "/v1/uploads/{sid}/complete": {
            "post": _op(
                "Complete an upload (repeat-safe)",
                "uploads",
                {
                    **_ok(202, _ref("UploadCompleted"), "Completed (or already was)."),
                    **_errors(400, 401, 403, 404, 409, 410, 413, 422, 507),
                },
                security=KEY_REQUIRED,
                parameters=[SESSION],
            ),
        },
        "/v1/tus/": {
            "options": _op(
                "tus discovery",
                "tus",
                _ok(
                    204,
                    None,
                    "The server's tus capabilities.",
                    headers={
                        **_TUS_HEADERS,
                        "Tus-Version": _header({"type": "string"}, "1.0.0", required=True),
                        "Tus-Extension": _header(
                            {"type": "string"}, tp.TUS_EXTENSIONS, required=True
                        ),
                        "Tus-Max-Size": _header(_INT_HEADER, "Bytes.", required=True),
                        "Tus-Checksum-Algorithm": _header(
                            {"type": "string"}, ",".join(tp.CHECKSUM_ALGORITHMS), required=True
                        ),
                    },
                ),
                security=NO_KEY,
            ),
            "post": _op(
                "tus creation (and creation-with-upload)",
                "tus",
                {
                    **_ok(
                        201,
                        None,
                        "Created.",
                        headers={
                            **_TUS_HEADERS,
                            "Location": _header(
                                {"type": "string", "format": "uri"},
                                "The upload resource.",
                                required=True,
                            ),
                            "Upload-Offset": _header(_INT_HEADER, "Bytes stored.", required=True),
                            "Upload-Expires": _header(
                                {"type": "string"}, "RFC 9110 date.", required=True
                            ),
                            "X-Video-Id": _header({"type": "string"}, "The video.", required=True),
                        },
                    ),
                    **_errors(400, 401, 412, 413, 415, 422, 429, 460, 507),
                },
                security=KEY_REQUIRED,
                parameters=[
                    _TUS_RESUMABLE,
                    _in_header(
                        "Upload-Length",
                        _INT_HEADER,
                        "Total bytes (required: deferred length is not supported).",
                        required=True,
                    ),
                    _in_header(
                        "Upload-Metadata",
                        {"type": "string", "maxLength": HEADER_MAX},
                        "`key base64value` pairs, comma-separated: title, filename, "
                        "description, visibility, filetype.",
                    ),
                    _CHECKSUM,
                ],
                raw_body=_OFFSET_BODY,
            ),
        },
        "/v1/tus/{sid}": {
            "options": _op(
                "tus discovery",
                "tus",
                _ok(204, None, "The server's tus capabilities.", headers=_TUS_HEADERS),
                security=NO_KEY,
                parameters=[SESSION],
            ),
            "head": _op(
                "The upload's offset",
                "tus",
                {
                    **_ok(
                        200,
                        None,
                        "The upload's state.",
                        headers={
                            **_TUS_HEADERS,
                            "Upload-Offset": _header(_INT_HEADER, "Bytes stored.", required=True),
                            "Upload-Length": _header(_INT_HEADER, "Total bytes.", required=True),
                            "Upload-Expires": _header({"type": "string"}, "While open."),
                            "Upload-Metadata": _header({"type": "string"}, "As created."),
                        },
                    ),
                    **_errors(*tus_errors, body=False),
                    **_errors(429, body=False),
                },
                security=KEY_REQUIRED,
                parameters=[SESSION, _TUS_RESUMABLE],
                limited=False,
            ),
            "patch": _op(
                "Append bytes at Upload-Offset",
                "tus",
                {
                    **_ok(
                        204,
                        None,
                        "Stored.",
                        headers={
                            **_TUS_HEADERS,
                            "Upload-Offset": _header(_INT_HEADER, "Bytes stored.", required=True),
                            "Upload-Expires": _header({"type": "string"}, "While open."),
                        },
                    ),
                    **_errors(*tus_errors, 409, 413, 415, 460, 507),
                },
                security=KEY_REQUIRED,
                parameters=[
                    SESSION,
                    _TUS_RESUMABLE,
                    _in_header(
                        "Upload-Offset", _INT_HEADER, "Must equal the stored offset.", required=True
                    ),
                    _CHECKSUM,
                ],
                raw_body={**_OFFSET_BODY, "required": True},
            ),
            "delete": _op(
                "tus termination",
                "tus",
                {
                    **_ok(204, None, "Terminated.", headers=_TUS_HEADERS),
                    **_errors(*tus_errors, 409),
                },
                security=KEY_REQUIRED,
                parameters=[SESSION, _TUS_RESUMABLE],
            ),
            "post": _op(
                "PATCH or DELETE for clients that cannot send them",
                "tus",
                {
                    **_ok(204, None, "As PATCH or DELETE.", headers=_TUS_HEADERS),
                    **_errors(*tus_errors, 409, 413, 415, 460, 507),
                },
                security=KEY_REQUIRED,
                parameters=[
                    SESSION,
                    _TUS_RESUMABLE,
                    _in_header(
                        "X-HTTP-Method-Override",
                        {"type": "string", "enum": list(tp.OVERRIDABLE)},
                        "The method this POST stands for.",
                        required=True,
                    ),
                    _in_header("Upload-Offset", _INT_HEADER, "For PATCH."),
                    _CHECKSUM,
                ],
                raw_body=_OFFSET_BODY,
            ),
        },
        "/v1/videos/{id}": {
            "get": _op(
                "A video",
                "videos",
                {**_ok(200, _ref("Video"), "The video."), **_errors(401, 404, 410, 451)},
                security=KEY_OPTIONAL,
                parameters=[VIDEO],
            ),
            "patch": _op(
                "Change title, description or visibility (owner or operator)",
                "videos",
                {
                    **_ok(200, _ref("Video"), "The updated video."),
                    **_errors(400, 401, 403, 404, 410, 413, 422, 451),
                },
                security=KEY_REQUIRED,
                parameters=[VIDEO],
                body=_ref("VideoPatch"),
            ),
            "delete": _op(
                "Delete (takedown with 410; media moved to the restricted prefix)",
                "moderation",
                {
                    **_ok(200, _ref("Takedown"), "Deleted."),
                    **_errors(400, 401, 403, 404, 409, 413, 422),
                },
                security=KEY_REQUIRED,
                body=_ref("Reason"),
                body_required=False,
                parameters=[
                    VIDEO,
                    REASON,
                ],
                operator=True,
            ),
        },
        "/v1/videos/{id}/playback": {
            "get": _op(
                "Signed playback URLs (READY videos)",
                "videos",
                {
                    **_ok(200, _ref("Playback"), "Playback URLs with a token in the path."),
                    **_errors(401, 403, 404, 409, 410, 451),
                },
                security=KEY_OPTIONAL,
                parameters=[VIDEO],
            ),
        },
        "/v1/me/videos": {
            "get": _op(
                "The caller's videos, newest first",
                "videos",
                {**_ok(200, _ref("VideoPage"), "One page."), **_errors(400, 401)},
                security=KEY_REQUIRED,
                parameters=[
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": ME_MAX_LIMIT},
                        "Page size.",
                    ),
                    _query(
                        "cursor",
                        {"type": "string", "maxLength": ME_MAX_CURSOR, "pattern": CURSOR},
                        "`nextCursor` of the previous page.",
                    ),
                ],
            ),
        },
        "/v1/keys/jwks.json": {
            "get": _op(
                "Public signing keys (JWKS)",
                "keys",
                _ok(200, _ref("Jwks"), "The keys."),
                security=NO_KEY,
                limited=lim("/v1/keys/jwks.json"),
            ),
        },
        "/v1/keys/rotate": {
            "post": _op(
                "Rotate the signing key",
                "keys",
                {**_ok(200, _ref("Rotated"), "Rotated."), **_errors(401, 403)},
                security=KEY_REQUIRED,
                operator=True,
            ),
        },
        "/v1/keys/{kid}": {
            "delete": _op(
                "Revoke a signing key",
                "keys",
                {**_ok(200, _ref("Revoked"), "Revoked."), **_errors(401, 403, 404)},
                security=KEY_REQUIRED,
                parameters=[_path_param("kid", None, "A key id (JWKS `kid`).")],
                operator=True,
            ),
        },
        "/v1/api-keys": {
            "get": _op(
                "API keys: every key for an operator, its own for a creator (never secrets)",
                "keys",
                {**_ok(200, _ref("ApiKeys"), "The keys, oldest first."), **_errors(401, 403)},
                security=KEY_REQUIRED,
            ),
        },
        "/v1/api-keys/{keyId}": {
            "delete": _op(
                "Revoke an API key (an operator: any; a creator: its own); refused at once",
                "keys",
                {**_ok(200, _ref("ApiKey"), "Revoked (or already was)."), **_errors(401, 403, 404)},
                security=KEY_REQUIRED,
                parameters=[_path_param("keyId", API_KEY_ID, "An API key id (`keyId`).")],
            ),
        },
        "/v1/search": {
            "get": _op(
                "Search READY public videos",
                "search",
                {**_ok(200, _ref("SearchPage"), "One page, best first."), **_errors(400, 422)},
                security=NO_KEY,
                parameters=[
                    _query(
                        "q",
                        {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
                        "Search terms (plain text, no operators).",
                        required=True,
                    ),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": SEARCH_MAX_LIMIT},
                        "Page size.",
                    ),
                    _query(
                        "cursor",
                        {"type": "string", "maxLength": 256, "pattern": CURSOR},
                        "`nextCursor` of the previous page of the same query.",
                    ),
                ],
            ),
        },
        "/v1/playback-events": {
            "post": _op(
                "Append playback events (one or a batch)",
                "engagement",
                {**_ok(202, _ref("Accepted"), "Appended."), **_errors(400, 413, 422, 503)},
                security=NO_KEY,
                body=_ref("PlaybackEvents"),
            ),
        },
        "/v1/videos/{id}/like": {
            "put": _op(
                "Like (idempotent)",
                "engagement",
                {**_ok(200, _ref("Like"), "Liked."), **_errors(401, 403, 404, 410, 451)},
                security=KEY_REQUIRED,
                parameters=[VIDEO],
            ),
            "delete": _op(
                "Unlike (idempotent)",
                "engagement",
                {**_ok(200, _ref("Like"), "Not liked."), **_errors(401, 403, 404, 410, 451)},
                security=KEY_REQUIRED,
                parameters=[VIDEO],
            ),
        },
        "/v1/videos/{id}/comments": {
            "post": _op(
                "Comment",
                "engagement",
                {
                    **_ok(201, _ref("Comment"), "Created."),
                    **_errors(400, 401, 403, 404, 410, 413, 422, 451),
                },
                security=KEY_REQUIRED,
                parameters=[VIDEO],
                body=_ref("CommentRequest"),
            ),
            "get": _op(
                "Comments, newest first",
                "engagement",
                {
                    **_ok(200, _ref("CommentPage"), "One page."),
                    **_errors(400, 401, 403, 404, 410, 451),
                },
                security=KEY_OPTIONAL,
                parameters=[
                    VIDEO,
                    _query(
                        "limit", {"type": "integer", "minimum": 1, "maximum": 100}, "Page size."
                    ),
                    _query(
                        "cursor",
                        {"type": "string", "maxLength": 64, "pattern": CURSOR},
                        "`nextCursor` of the previous page.",
                    ),
                ],
            ),
        },
        "/v1/videos/{id}/comments/{cid}": {
            "delete": _op(
                "Delete a comment (its author or an operator)",
                "engagement",
                {**_ok(204, None, "Deleted."), **_errors(401, 403, 404, 410, 451)},
                security=KEY_REQUIRED,
                parameters=[VIDEO, _path_param("cid", COMMENT_ID, "A comment id.")],
            ),
        },
        "/v1/videos/{id}/block": {
            "post": _op(
                "Block (takedown with 451)",
                "moderation",
                {
                    **_ok(200, _ref("Takedown"), "Blocked."),
                    **_errors(400, 401, 403, 404, 409, 413, 422),
                },
                security=KEY_REQUIRED,
                body=_ref("Reason"),
                body_required=False,
                parameters=[
                    VIDEO,
                    REASON,
                ],
                operator=True,
            ),
        },
        "/v1/videos/{id}/unblock": {
            "post": _op(
                "Unblock",
                "moderation",
                {
                    **_ok(200, _ref("Takedown"), "Back to the state before the block."),
                    **_errors(401, 403, 404, 409),
                },
                security=KEY_REQUIRED,
                parameters=[VIDEO],
                operator=True,
            ),
        },
        "/v1/videos/{id}/restore": {
            "post": _op(
                "Restore a deleted video",
                "moderation",
                {
                    **_ok(200, _ref("Takedown"), "Back to the state before the delete."),
                    **_errors(400, 401, 403, 404, 409, 413, 422),
                },
                security=KEY_REQUIRED,
                body=_ref("Reason"),
                body_required=False,
                parameters=[VIDEO, REASON],
                operator=True,
            ),
        },
        "/v1/cutoffs": {
            "get": _op(
                "Every video's token cutoff (for caching nodes)",
                "moderation",
                {
                    **_ok(
                        200,
                        {"anyOf": [_ref("Cutoffs"), _ref("CutoffsWithRefusals")]},
                        "`{videoId: epoch seconds}`; with `refusals=1`, `{cutoffs, refusals}`.",
                    ),
                    **_errors(401, 403),
                },
                security=NODE,
                limited=lim("/v1/cutoffs"),
                parameters=[
                    _query(
                        "refusals",
                        {"type": "string"},
                        "`1`: also say why each taken-down video is refused (blocked/deleted).",
                    )
                ],
            ),
        },
        "/v1/purges": {
            "post": _op(
                "Append a purge to the log",
                "purges",
                {
                    **_ok(202, _ref("PurgeCreated"), "Appended."),
                    **_errors(400, 401, 403, 404, 413, 422),
                },
                security=KEY_REQUIRED,
                body=_ref("PurgeRequest"),
                operator=True,
            ),
        },
        "/v1/purges/stream": {
            "get": _op(
                "The purge log as server-sent events (never ends)",
                "purges",
                {
                    "200": {
                        "description": "`event: purge` (id: seq, data: the purge as JSON), "
                        "once `event: live` (data: the last seq sent), `: ping` comments.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 401, 403, 422),
                },
                security=NODE,
                limited=lim("/v1/purges/stream"),
                parameters=[
                    _query("after", {"type": "integer", "minimum": 0}, "Resume after this seq."),
                    _query(
                        "node",
                        {"type": "string", "minLength": 1, "maxLength": 80},
                        "The follower's id.",
                        required=True,
                    ),
                    _query(
                        "tier", {"type": "string", "enum": list(TIERS)}, "Its tier.", required=True
                    ),
                ],
            ),
        },
        "/v1/purges/acks": {
            "post": _op(
                "A node applied purges",
                "purges",
                {
                    **_ok(200, _ref("PurgeAcked"), "Recorded."),
                    # 422 also for a seq above the log's last; 429: the credential's own budget
                    **_errors(400, 401, 403, 413, 422, 429),
                },
                security=NODE,
                body=_ref("PurgeAck"),
                limited=lim("/v1/purges/acks"),
            ),
        },
        "/v1/purges/{id}": {
            "get": _op(
                "Which nodes applied a purge",
                "purges",
                {**_ok(200, _ref("PurgeStatus"), "Its status."), **_errors(401, 403, 404)},
                security=KEY_REQUIRED,
                parameters=[_path_param("id", PURGE_ID, "A purge id (`purgeId`).")],
                operator=True,
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vodstack control API",
            "version": "1",
            "description": "Uploads, videos, playback, search, engagement, purges and takedowns. "
            "Errors are always JSON `{error: {code, message}}`.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(max_upload_bytes),
            "responses": _error_responses(),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`vod keys create`), as `Authorization: Bearer K`.",
                },
                "nodeCredential": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A node credential (`vod nodes create`), as "
                    "`Authorization: Bearer vodn_…`: edges, shields and origins only.",
                },
            },
        },
    }


class OpenApi:
    """Serves the document at `PATH` (`OpenApi(settings.max_upload_bytes).routes(app)`)."""

    def __init__(self, max_upload_bytes: int) -> None:
        self.body = orjson.dumps(document(max_upload_bytes))

    def routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self.serve)

    async def serve(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.body, content_type=JSON, headers={"Cache-Control": "no-cache"}
        )
