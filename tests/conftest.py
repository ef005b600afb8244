"""Shared fixtures: the backend switch (`--backend`, tests/backends.py), ffmpeg, synthetic
clips made with lavfi sources, free ports."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.backends import EMBEDDED, ENV_VAR, KINDS, REDIS_BASE_URL, Backend, Backends, shown
from tests.pgdb import PG_URL
from tests.s3server import S3Server
from vodcore.config import Settings
from vodcore.db.engine import create_schema, make_engine
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.store import ObjectStore
from vodcore.store.factory import close_store, make_store

# Property tests check behaviour, not speed: no per-example deadline on shared, busy cores.
settings.register_profile("vodstack", deadline=None)
settings.load_profile("vodstack")

# Fixtures through which a test gets its backend: a test that uses none of them cannot depend
# on `--backend`, so a run on another backend than the embedded one leaves it out.
BACKEND_FIXTURES = {"backend", "backends"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        choices=KINDS,
        default=os.environ.get(ENV_VAR) or EMBEDDED,
        help="what the backend-dependent tests run on: embedded (SQLite, filesystem store) or"
        " scale (PostgreSQL, Redis, S3 on moto); default $VOD_TEST_BACKEND or embedded",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "own_backends: the test covers several backends itself (parametrized, or a backend by"
        " nature); it does not follow --backend and runs in the embedded run only",
    )


def pytest_report_header(config: pytest.Config) -> str:
    kind = config.getoption("--backend")
    if kind == EMBEDDED:
        return "backend: embedded (SQLite + filesystem store, no Redis)"
    return (
        f"backend: {kind} (PostgreSQL {shown(PG_URL)}, Redis {shown(REDIS_BASE_URL)}, S3 on"
        " moto); only the tests that use the `backend` fixture run, the others are deselected"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a backend other than the embedded default, keep only the tests that follow it."""
    if config.getoption("--backend") == EMBEDDED:
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        follows = BACKEND_FIXTURES & set(getattr(item, "fixturenames", ()))
        (keep if follows and not item.get_closest_marker("own_backends") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def backends(request: pytest.FixtureRequest) -> Iterator[Backends]:
    """The session's supply of backends of the kind `--backend` names (see tests/backends.py);
    module fixtures take theirs with `backends.lease()`."""
    b = Backends(request.config.getoption("--backend"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def backend(backends: Backends) -> Iterator[Backend]:
    """This test's private backend: `backend.settings(data_dir, …)`, `backend.env()`."""
    with backends.lease() as b:
        yield b


@pytest.fixture(scope="session")
def s3(backends: Backends) -> S3Server:
    """moto's S3 server for the session (the one scale backends get their buckets from) and
    its default bucket, for the tests of S3 itself."""
    return backends.s3_server()


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


# The metadata database and object store of a module's own `settings` fixture (the transcoder
# and media-input suites); a module that needs another kind defines its own `engine`/`store`.
@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    eng = make_engine(settings.db_url)
    await create_schema(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ObjectStore]:
    """The object store the pool writes to (`make_store`: the filesystem or S3)."""
    st = make_store(settings)
    yield st
    await close_store(st)
