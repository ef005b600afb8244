"""Object-store layout (DESIGN.md): where each kind of object lives, in one place.

- `source/{videoId}/original`: the upload as received, never deleted;
- `media/{videoId}/{version}/{file}`: one encoded version; immutable once published, a new
  version is written beside it and published by flipping the video's current version.
"""

from __future__ import annotations


def source_key(video_id: str) -> str:
    return f"source/{video_id}/original"


def version_prefix(video_id: str, version: int) -> str:
    return f"media/{video_id}/{version}/"
