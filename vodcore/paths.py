"""Pure validation of object keys and URL paths.

Every tier maps URL paths to object-store keys. A key is a '/'-joined list of segments, each
made of [A-Za-z0-9._-] and never '.' or '..'. Anything else (percent-encoded dots or slashes,
NUL bytes, backslashes, absolute paths, empty segments) raises `BadPath`, which servers map to
400. Validation works on the *raw* (still percent-encoded) path as well as the decoded one, so
`%2e%2e` and `%2f` can never smuggle a traversal past a decoder.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")


class BadPath(ValueError):
    """The path or key is not a safe object key."""


def check_segment(seg: str) -> str:
    if not seg or seg in (".", "..") or not _SEGMENT.match(seg) or len(seg) > 255:
        raise BadPath(f"bad path segment {seg!r}")
    return seg


def split_key(key: str) -> list[str]:
    """Split and validate an object key like 'media/v1/3/seg.m4s'."""
    if "\x00" in key or "\\" in key:
        raise BadPath("NUL or backslash in key")
    if key.startswith("/"):
        raise BadPath("absolute key")
    parts = key.split("/")
    for p in parts:
        check_segment(p)
    return parts


def check_key(key: str) -> str:
    split_key(key)
    return key


def split_raw_path(raw_path: str) -> list[str]:
    """Validate a request's raw path (before percent-decoding) and return its segments.

    Each segment is decoded and must then be a safe segment, so '%2e%2e' (which decodes to
    '..') is refused; an encoded '/', '\\' or NUL would hide a separator and is refused outright.
    """
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        raise BadPath("path must be absolute")
    out: list[str] = []
    for raw in path[1:].split("/"):
        lowered = raw.lower()
        if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
            raise BadPath("encoded separator or NUL in path")
        out.append(check_segment(unquote(raw) if "%" in raw else raw))
    return out
