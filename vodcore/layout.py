"""Object-store layout (DESIGN.md): where each kind of object lives, in one place.

- `source/{videoId}/original`: the upload as received, never deleted (not even by a takedown);
- `media/{videoId}/{version}/{file}`: one encoded version; immutable once published, a new
  version is written beside it and published by flipping the video's current version;
- `restricted/media/{videoId}/…`: the `media/` objects of a deleted video, moved there whole (same
  relative keys) so a restore can move them back. No tier serves anything outside `media/`.
"""

from __future__ import annotations

RESTRICTED = "restricted/"


def source_key(video_id: str) -> str:
    return f"source/{video_id}/original"


def version_prefix(video_id: str, version: int) -> str:
    return f"media/{video_id}/{version}/"


def media_prefix(video_id: str) -> str:
    """Every encoded object of a video (all versions)."""
    return f"media/{video_id}/"


def restricted_prefix(video_id: str) -> str:
    """Where a deleted video's encoded objects are kept, restorable."""
    return RESTRICTED + media_prefix(video_id)


def restricted_key(key: str) -> str:
    """`media/…` → `restricted/media/…`."""
    if not key.startswith("media/"):
        raise ValueError(f"not a media key: {key!r}")
    return RESTRICTED + key


def unrestricted_key(key: str) -> str:
    """`restricted/media/…` → `media/…`."""
    if not key.startswith(RESTRICTED + "media/"):
        raise ValueError(f"not a restricted media key: {key!r}")
    return key[len(RESTRICTED) :]
