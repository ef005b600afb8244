"""What the origin says about an object: Content-Type and Cache-Control (pure).

Rules (DESIGN.md "Caching rules"):
- anything under a numeric version segment, `/v/{videoId}/{digits}/…`, never changes (a new
  version is written beside the old one), so it is `public, max-age=31536000, immutable`
  (RFC 8246 for `immutable`);
- anything else (unversioned) is fresh for 60 s; after that caches may serve it for 30 s more
  while one revalidation runs (RFC 5861 §3) and for a day while the origin fails (RFC 5861 §4):
  an origin outage then degrades to slightly old manifests instead of errors;
- Content-Type comes from the extension; unknown extensions are application/octet-stream.
"""

from __future__ import annotations

IMMUTABLE = "public, max-age=31536000, immutable"
SHORT = "public, max-age=60, stale-while-revalidate=30, stale-if-error=86400"

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
