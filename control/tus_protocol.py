"""Pure parts of the tus 1.0.0 resumable upload protocol (https://tus.io/protocols/resumable-upload).

No I/O here: header parsing and the checks a PATCH must pass, raising `ApiError`s from the one
catalogue. The server (`control/tus.py`) is a thin shell around these.

Rules:
- every request but OPTIONS carries `Tus-Resumable: 1.0.0`, else 412 with `Tus-Version`
  (§Tus-Resumable);
- a PATCH carries `Content-Type: application/offset+octet-stream` (else 415) and an
  `Upload-Offset` equal to the stored offset (else 409) (§PATCH);
- `Upload-Length` is a non-negative integer within the configured maximum (else 413) (§Creation);
- `Upload-Metadata` is comma-separated `key base64value` pairs; keys are unique, ASCII, no
  spaces or commas (§Upload-Metadata).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from vodcore.errors import (
    BAD_REQUEST,
    OFFSET_MISMATCH,
    PRECONDITION,
    TOO_LARGE,
    UNSUPPORTED_MEDIA,
    ApiError,
)

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,expiration"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"


def check_version(headers: Mapping[str, str]) -> None:
    if headers.get("Tus-Resumable") != TUS_VERSION:
        raise ApiError(
            PRECONDITION,
            f"Tus-Resumable must be {TUS_VERSION}",
            headers={"Tus-Version": TUS_VERSION},
        )


def parse_length(value: str | None, maximum: int) -> int:
    if value is None:
        raise ApiError(BAD_REQUEST, "Upload-Length is required (deferred length is not supported)")
    if not value.isdigit():
        raise ApiError(BAD_REQUEST, "Upload-Length must be a non-negative integer")
    n = int(value)
    if n > maximum:
        raise ApiError(TOO_LARGE, f"Upload-Length exceeds the maximum of {maximum} bytes")
    return n


def parse_offset(value: str | None) -> int:
    if value is None or not value.isdigit():
        raise ApiError(BAD_REQUEST, "Upload-Offset must be a non-negative integer")
    return int(value)


def parse_metadata(value: str | None) -> dict[str, str]:
    """Decode Upload-Metadata; values that are not valid UTF-8 are refused."""
    out: dict[str, str] = {}
    if not value:
        return out
    for pair in value.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, b64 = pair.partition(" ")
        if not key or not key.isascii() or key in out:
            raise ApiError(BAD_REQUEST, "Upload-Metadata has an invalid or repeated key")
        try:
            out[key] = base64.b64decode(b64.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            msg = f"Upload-Metadata value for {key!r} is not base64 UTF-8"
            raise ApiError(BAD_REQUEST, msg) from None
    return out


def check_patch(headers: Mapping[str, str], stored_offset: int) -> int:
    """Validate a PATCH's headers against the stored offset; return the client's offset."""
    ctype = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != OFFSET_CONTENT_TYPE:
        raise ApiError(UNSUPPORTED_MEDIA, f"PATCH needs Content-Type: {OFFSET_CONTENT_TYPE}")
    offset = parse_offset(headers.get("Upload-Offset"))
    if offset != stored_offset:
        raise ApiError(
            OFFSET_MISMATCH,
            f"Upload-Offset {offset} does not match the stored offset {stored_offset}",
            headers={"Upload-Offset": str(stored_offset)},
            extra={"offset": stored_offset},
        )
    return offset
