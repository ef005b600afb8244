"""Shared fixtures: ffmpeg, synthetic clips made with lavfi sources, free ports."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

from vodcore.ffmpeg import ffmpeg_exe

# Property tests check behaviour, not speed: no per-example deadline on shared, busy cores.
settings.register_profile("vodstack", deadline=None)
settings.load_profile("vodstack")


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    return ffmpeg_exe()


def make_clip(
    ffmpeg: str, out: Path, seconds: float = 4, size: str = "640x360", preset: str = "veryfast"
) -> Path:
    """A synthetic H.264 + AAC mp4 from lavfi sources (moving test pattern, a sine tone)."""
    subprocess.run(
        [ffmpeg, "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
         "-c:v", "libx264", "-preset", preset, "-c:a", "aac", "-shortest", str(out)],
        check=True, timeout=60,
    )  # fmt: skip
    return out


@pytest.fixture
def clip(ffmpeg: str, tmp_path: Path) -> Callable[..., Path]:
    def _make(seconds: float = 4, size: str = "640x360", name: str = "clip.mp4") -> Path:
        return make_clip(ffmpeg, tmp_path / name, seconds, size)

    return _make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
