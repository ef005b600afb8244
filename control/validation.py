"""Pure validation of API request bodies. Each function takes decoded JSON and returns a typed
value or raises `ApiError(VALIDATION)` naming the field, so bad input is a clear 422.

Text fields: strings only; leading and trailing whitespace is stripped and nothing else is
touched (no Unicode normalisation: a title comes back exactly as sent); at most `MAX_TITLE` /
`MAX_DESCRIPTION` characters (code points); no NUL (PostgreSQL text cannot hold it). A title
must not be empty; a description may be. `visibility` is one of `VISIBILITIES`. An upload's
`method` is `tus` (the default: bytes go to the tus resource) or `s3-multipart` (presigned part
URLs straight to the S3 object store, see `control/multipart.py`).

A metadata change (`video_patch`) names only `PATCH_FIELDS`: an unknown field is refused rather
than ignored (a typo must not look like success), and so is an empty change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from vodcore.errors import BAD_JSON, TOO_LARGE, VALIDATION, ApiError

VISIBILITIES = ("public", "unlisted", "private")
MAX_TITLE = 300
MAX_DESCRIPTION = 5000
UPLOAD_METHODS = ("tus", "s3-multipart")


@dataclass(frozen=True, slots=True)
class UploadRequest:
    title: str
    description: str
    visibility: str
    content_type: str | None
    size_bytes: int
    method: str = "tus"


def decode_json(body: bytes) -> Any:
    if not body:
        raise ApiError(BAD_JSON, "a JSON body is required")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(BAD_JSON, f"the body is not valid JSON: {e}") from None


def _field_error(field: str, why: str) -> ApiError:
    return ApiError(VALIDATION, f"{field}: {why}", extra={"field": field})


def _text(doc: dict[str, Any], field: str, limit: int, *, required: bool) -> str:
    value = doc.get(field)
    if value is None:
        if required:
            raise _field_error(field, "is required")
        return ""
    if not isinstance(value, str):
        raise _field_error(field, "must be a string")
    value = value.strip()
    if required and not value:
        raise _field_error(field, "must not be empty")
    if len(value) > limit or "\x00" in value:
        raise _field_error(field, f"must be at most {limit} characters, without NUL")
    return value


def upload_request(doc: Any, max_bytes: int) -> UploadRequest:
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be a JSON object")
    title = _text(doc, "title", MAX_TITLE, required=True)
    description = _text(doc, "description", MAX_DESCRIPTION, required=False)
    visibility = doc.get("visibility", "public")
    if visibility not in VISIBILITIES:
        raise _field_error("visibility", f"must be one of {', '.join(VISIBILITIES)}")
    ctype = doc.get("contentType")
    if ctype is not None and (not isinstance(ctype, str) or len(ctype) > 100):
        raise _field_error("contentType", "must be a short string")
    size = doc.get("sizeBytes")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise _field_error("sizeBytes", "must be a positive integer")
    if size > max_bytes:
        raise ApiError(TOO_LARGE, f"sizeBytes exceeds the maximum of {max_bytes} bytes")
    method = doc.get("method", "tus")
    if method not in UPLOAD_METHODS:
        raise _field_error("method", f"must be one of {', '.join(UPLOAD_METHODS)}")
    return UploadRequest(title, description, visibility, ctype, size, method)


PATCH_FIELDS = ("title", "description", "visibility")


def video_patch(doc: Any) -> dict[str, str]:
    """The fields a `PATCH /v1/videos/{id}` body changes, validated: {column: new value}."""
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be a JSON object")
    unknown = sorted(k for k in doc if k not in PATCH_FIELDS)
    if unknown:
        raise _field_error(
            unknown[0], f"is not a field that can be changed ({', '.join(PATCH_FIELDS)})"
        )
    if not doc:
        raise ApiError(VALIDATION, f"nothing to change: give one of {', '.join(PATCH_FIELDS)}")
    for name, value in doc.items():
        if not isinstance(value, str):
            raise _field_error(name, "must be a string")
    changes: dict[str, str] = {}
    if "title" in doc:
        changes["title"] = _text(doc, "title", MAX_TITLE, required=True)
    if "description" in doc:
        changes["description"] = _text(doc, "description", MAX_DESCRIPTION, required=False)
    if "visibility" in doc:
        if doc["visibility"] not in VISIBILITIES:
            raise _field_error("visibility", f"must be one of {', '.join(VISIBILITIES)}")
        changes["visibility"] = doc["visibility"]
    return changes
