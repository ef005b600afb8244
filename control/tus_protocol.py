"""Pure parts of the tus 1.0.0 resumable upload protocol (https://tus.io/protocols/resumable-upload).

No I/O here: header parsing and the checks a request must pass, raising `ApiError`s from the one
catalogue. The server (`control/tus.py`) is a thin shell around these; storage is
`control/uploads.py`. Section numbers are those of the 1.0.0 document (§6 Core Protocol, §7.1
Creation, §7.2 Creation With Upload, §7.3 Expiration, §7.4 Checksum, §7.5 Termination).

Rules:
- every request but OPTIONS carries `Tus-Resumable: 1.0.0`, else 412 with `Tus-Version`
  (§6 Tus-Resumable); OPTIONS answers `Tus-Version`, `Tus-Extension`, `Tus-Max-Size` and
  `Tus-Checksum-Algorithm` (§6 OPTIONS, §7.4);
- `Upload-Length` and `Upload-Offset` are non-negative decimal integers in ASCII digits (`²` is a
  digit to `str.isdigit`, not to HTTP): malformed → 400; an `Upload-Length` above the maximum
  (however many digits it has) → 413 (§6 Upload-Length, §6 Tus-Max-Size); deferred length is not
  offered, so a missing `Upload-Length` is 400 (§7.1);
- a PATCH carries `Content-Type: application/offset+octet-stream` (else 415) and an
  `Upload-Offset` equal to the stored offset (else 409, answering the stored offset) (§6 PATCH);
  a body declared longer than what is left of `Upload-Length` is 413 before a byte is read;
- `Upload-Metadata` is comma-separated `key base64value` pairs: keys unique, non-empty, printable
  ASCII without spaces or commas; values strict base64 of UTF-8 without NUL; a value may be
  absent (§7.1 Upload-Metadata). Anything else → 400;
- `Upload-Checksum: <algorithm> <base64 digest>` covers one PATCH body (§7.4): an algorithm not
  in `CHECKSUM_ALGORITHMS` → 400, a malformed value (no space, bad base64, wrong digest length)
  → 400, a mismatch → 460 Checksum Mismatch, and nothing of that body is kept;
- `Upload-Expires` is an RFC 9110 IMF-fixdate (§7.3); an expired upload is 410, one that was
  removed (expired and cleaned up, or terminated) is 404 (§7.3, §7.5);
- `X-HTTP-Method-Override: PATCH|DELETE` on a POST to an upload resource is that method
  (§6 X-HTTP-Method-Override), for environments that cannot send them.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol

from vodcore.errors import (
    BAD_REQUEST,
    OFFSET_MISMATCH,
    PRECONDITION,
    TOO_LARGE,
    UNSUPPORTED_MEDIA,
    ApiError,
)
from vodcore.errors import CHECKSUM_MISMATCH as CHECKSUM_MISMATCH  # tus §7.4's own status

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5")
OVERRIDABLE = ("PATCH", "DELETE")

_MAX_DIGITS = 19  # 2**63 - 1 has 19 digits; int() of thousands of digits would raise
_UINT = re.compile(r"[0-9]+")
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "md5": 16}


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Checksum:
    algorithm: str
    digest: bytes

    def hasher(self) -> Hasher:
        return hashlib.new(self.algorithm, usedforsecurity=False)

    def matches(self, digest: bytes) -> bool:
        return digest == self.digest


def check_version(headers: Mapping[str, str]) -> None:
    if headers.get("Tus-Resumable") != TUS_VERSION:
        raise ApiError(
            PRECONDITION,
            f"Tus-Resumable must be {TUS_VERSION}",
            headers={"Tus-Version": TUS_VERSION},
        )


def _uint(value: str) -> int | None:
    """A non-negative ASCII decimal, or None if malformed; huge values come back as -1."""
    value = value.strip()
    if not _UINT.fullmatch(value):
        return None
    if len(value.lstrip("0")) > _MAX_DIGITS:
        return -1
    return int(value)


def parse_length(value: str | None, maximum: int) -> int:
    if value is None:
        raise ApiError(BAD_REQUEST, "Upload-Length is required (deferred length is not supported)")
    n = _uint(value)
    if n is None:
        raise ApiError(BAD_REQUEST, "Upload-Length must be a non-negative integer")
    if n < 0 or n > maximum:
        raise ApiError(TOO_LARGE, f"Upload-Length exceeds the maximum of {maximum} bytes")
    return n


def parse_offset(value: str | None) -> int:
    n = None if value is None else _uint(value)
    if n is None or n < 0:
        raise ApiError(BAD_REQUEST, "Upload-Offset must be a non-negative integer")
    return n


def _metadata_key_ok(key: str) -> bool:
    return bool(key) and key.isascii() and key.isprintable() and " " not in key and "," not in key


def parse_metadata(value: str | None) -> dict[str, str]:
    """Decode Upload-Metadata; values that are not strict base64 of UTF-8 are refused."""
    out: dict[str, str] = {}
    if not value:
        return out
    for pair in value.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, b64 = pair.partition(" ")
        if not _metadata_key_ok(key) or key in out:
            raise ApiError(BAD_REQUEST, "Upload-Metadata has an invalid or repeated key")
        try:
            # ValueError covers binascii.Error and non-ASCII characters in the header
            decoded = base64.b64decode(b64.strip(), validate=True).decode("utf-8")
        except ValueError:
            msg = f"Upload-Metadata value for {key!r} is not base64 UTF-8"
            raise ApiError(BAD_REQUEST, msg) from None
        if "\x00" in decoded:
            raise ApiError(BAD_REQUEST, f"Upload-Metadata value for {key!r} contains NUL")
        out[key] = decoded
    return out


def encode_metadata(meta: Mapping[str, str]) -> str:
    """The Upload-Metadata header value a HEAD answers (§7.1: as the client sent it)."""
    parts = []
    for key, value in meta.items():
        if value:
            parts.append(f"{key} {base64.b64encode(value.encode()).decode('ascii')}")
        else:
            parts.append(key)
    return ",".join(parts)


def parse_checksum(value: str | None) -> Checksum | None:
    """Upload-Checksum (§7.4), None when absent."""
    if value is None:
        return None
    algorithm, _, b64 = value.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        supported = ",".join(CHECKSUM_ALGORITHMS)
        raise ApiError(
            BAD_REQUEST,
            f"Upload-Checksum algorithm {algorithm!r} is not supported (use one of {supported})",
            headers={"Tus-Checksum-Algorithm": supported},
        )
    try:
        digest = base64.b64decode(b64.strip(), validate=True)
    except ValueError:
        raise ApiError(BAD_REQUEST, "Upload-Checksum digest is not base64") from None
    if len(digest) != _DIGEST_SIZES[algorithm]:
        raise ApiError(BAD_REQUEST, f"Upload-Checksum digest has the wrong length for {algorithm}")
    return Checksum(algorithm, digest)


def checksum_mismatch(stored_offset: int) -> ApiError:
    return ApiError(
        CHECKSUM_MISMATCH,
        "the body does not match Upload-Checksum; nothing of it was kept",
        headers={"Upload-Offset": str(stored_offset)},
        extra={"offset": stored_offset},
    )


def check_content_type(headers: Mapping[str, str]) -> None:
    ctype = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != OFFSET_CONTENT_TYPE:
        raise ApiError(UNSUPPORTED_MEDIA, f"PATCH needs Content-Type: {OFFSET_CONTENT_TYPE}")


def offset_mismatch(offset: int, stored_offset: int) -> ApiError:
    return ApiError(
        OFFSET_MISMATCH,
        f"Upload-Offset {offset} does not match the stored offset {stored_offset}",
        headers={"Upload-Offset": str(stored_offset)},
        extra={"offset": stored_offset},
    )


def check_offset(offset: int, stored_offset: int) -> int:
    if offset != stored_offset:
        raise offset_mismatch(offset, stored_offset)
    return offset


def check_patch(headers: Mapping[str, str], stored_offset: int) -> int:
    """Validate a PATCH's headers against the stored offset; return the client's offset."""
    check_content_type(headers)
    return check_offset(parse_offset(headers.get("Upload-Offset")), stored_offset)


def check_fits(offset: int, content_length: int | None, length: int) -> None:
    """A body declared longer than what is left of Upload-Length is refused up front (413)."""
    if content_length is not None and offset + content_length > length:
        raise ApiError(
            TOO_LARGE,
            f"the body ({content_length} bytes at offset {offset}) goes past "
            f"Upload-Length {length}",
        )


def method_override(headers: Mapping[str, str]) -> str:
    """The method a POST to an upload resource stands for (§6 X-HTTP-Method-Override)."""
    method = headers.get("X-HTTP-Method-Override", "").strip().upper()
    if method not in OVERRIDABLE:
        raise ApiError(
            BAD_REQUEST,
            "POST to an upload resource needs X-HTTP-Method-Override: PATCH or DELETE",
        )
    return method


def http_date(ts: float) -> str:
    """Upload-Expires value: RFC 9110 §5.6.7 IMF-fixdate (tus §7.3 says RFC 7231 datetime)."""
    return formatdate(ts, usegmt=True)
