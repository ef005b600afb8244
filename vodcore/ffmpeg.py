"""Where ffmpeg comes from: the configured path (settings.ffmpeg / VOD_FFMPEG), else the
`imageio-ffmpeg` wheel's bundled ffmpeg 9 (libx264, libx265, libsvtav1, libvmaf), so that
`pip install` is the whole set-up. The wheel ships no ffprobe; probing parses ffmpeg's own
stream report instead."""

from __future__ import annotations

import functools
import shutil

from vodcore.config import Settings


@functools.cache
def _bundled() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def ffmpeg_exe(settings: Settings | None = None) -> str:
    configured = settings.ffmpeg if settings else None
    if configured:
        found = shutil.which(configured)
        if not found:
            raise FileNotFoundError(f"configured ffmpeg not found: {configured}")
        return found
    return _bundled()
