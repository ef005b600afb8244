"""What the origin says about an object: Content-Type and Cache-Control (pure).

Rules (DESIGN.md "Caching rules"):
- anything under a numeric version segment, `/v/{videoId}/{digits}/…`, never changes (a new
  version is written beside the old one), so it is `public, max-age=31536000, immutable`
  (RFC 8246 for `immutable`);
- anything else (unversioned) is `public, max-age=60`;
- Content-Type comes from the extension; unknown extensions are application/octet-stream.
"""

from __future__ import annotations

IMMUTABLE = "public, max-age=31536000, immutable"
SHORT = "public, max-age=60"

CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",  # RFC 8216 §4
    ".mpd": "application/dash+xml",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".jpg": "image/jpeg",
    ".vtt": "text/vtt",
}
DEFAULT_TYPE = "application/octet-stream"


def cache_control(rest: list[str]) -> str:
    """Cache-Control for `/v/{videoId}/` + '/'.join(rest)."""
    versioned = len(rest) >= 2 and rest[0].isascii() and rest[0].isdigit()
    return IMMUTABLE if versioned else SHORT


def content_type(name: str) -> str:
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:].lower(), DEFAULT_TYPE) if dot > 0 else DEFAULT_TYPE
