"""A bounded fuzz run of the container parsers (issue 11, finding 1, defence in depth).

A small real clip (1 s, 160x120, H.264 + AAC in mp4, and the same in Matroska) is mutated with
a fixed seed: bytes flipped, the file truncated, one container's head spliced onto another's
body, a box or element size blown up. Each mutant is probed directly (the sandboxed, whitelisted
probe: it returns a `Probe` or raises `Unplayable`, nothing else, within the probe's own
timeouts), and a handful go through the real pipeline, where each video ends READY or FAILED
with a reason and the pool never dies. Small N: this is a regression guard, not a campaign.
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.backends import Backend
from tests.integration.test_transcoder import add_video, run_until_done, video_row
from transcoder.limits import check_picture
from transcoder.probe import Probe, Unplayable, probe
from vodcore.config import Settings
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.store import ObjectStore

FFMPEG = ffmpeg_exe()
SEED = 11
PROBED = 36  # mutants probed directly
PIPELINED = 8  # of which this many also go through the pool


def _clip(out: Path) -> bytes:
    subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=1",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-c:a", "aac", "-shortest",
         str(out)],
        check=True, timeout=60,
    )  # fmt: skip
    return out.read_bytes()


def _flip(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _head_flip(rng: random.Random, data: bytes) -> bytes:
    """Flips in the first 512 bytes, where the headers (and their sizes) are."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(min(512, len(b)))] = rng.randrange(256)
    return bytes(b)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(16, len(data))]


def _splice(rng: random.Random, a: bytes, b: bytes) -> bytes:
    return a[: rng.randrange(8, 1024)] + b[rng.randrange(0, len(b) // 2) :]


def _huge_box(rng: random.Random, data: bytes) -> bytes:
    """An mp4 whose second box claims to be gigantic (or tiny)."""
    first = struct.unpack(">I", data[:4])[0]
    size = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1, 7, 8])
    return data[:first] + struct.pack(">I", size) + data[first + 4 :]


def mutants(mp4: bytes, mkv: bytes, n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    out = []
    for i in range(n):
        kind = i % 6
        base = mp4 if rng.random() < 0.6 else mkv
        if kind == 0:
            out.append((f"{i}-flip", _flip(rng, base)))
        elif kind == 1:
            out.append((f"{i}-head", _head_flip(rng, base)))
        elif kind == 2:
            out.append((f"{i}-truncate", _truncate(rng, base)))
        elif kind == 3:
            out.append((f"{i}-splice", _splice(rng, mp4, mkv) if i % 2 else _splice(rng, mkv, mp4)))
        elif kind == 4:
            out.append((f"{i}-box", _huge_box(rng, mp4)))
        else:
            out.append((f"{i}-flip-truncate", _truncate(rng, _flip(rng, base))))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    d = tmp_path_factory.mktemp("fuzz")
    return mutants(_clip(d / "clip.mp4"), _clip(d / "clip.mkv"), PROBED)


async def test_the_probe_answers_every_mutant(
    corpus: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    outcomes: dict[str, int] = {"probe": 0, "unplayable": 0}
    for name, data in corpus:
        src = tmp_path / name
        src.write_bytes(data)
        # bounded: the probe's own timeouts stop a stuck ffmpeg long before this one
        async with asyncio.timeout(600):
            try:
                info = await probe(FFMPEG, src, check_picture)
            except Unplayable as e:
                assert str(e) and "\n" not in str(e) and "Traceback" not in str(e), name
                outcomes["unplayable"] += 1
                continue
        assert isinstance(info, Probe) and info.width >= 16 and info.height >= 16, name
        outcomes["probe"] += 1
    assert sum(outcomes.values()) == PROBED


@pytest.fixture
def settings(tmp_path: Path, backend: Backend) -> Settings:
    return backend.settings(tmp_path / "data", segment_seconds=2.0, quality_report=False)


async def test_the_pipeline_ends_every_mutant_ready_or_failed(
    settings: Settings,
    engine: AsyncEngine,
    store: ObjectStore,
    corpus: list[tuple[str, bytes]],
    tmp_path: Path,
) -> None:
    chosen = corpus[:PIPELINED]
    for i, (_, data) in enumerate(chosen):
        path = tmp_path / f"m{i}"
        path.write_bytes(data)
        await add_video(engine, store, f"fuzz{i:02d}", path)
    # run_until_done fails the test if the pool dies or a job is still open after 60 s
    await run_until_done(settings, engine, len(chosen), slots=2)
    for i, (name, _) in enumerate(chosen):
        row = await video_row(engine, f"fuzz{i:02d}")
        assert row["state"] in ("READY", "FAILED"), (name, row["state"])
        if row["state"] == "FAILED":
            reason = str(row["failure_reason"] or "")
            assert reason and "Traceback" not in reason, (name, reason)
