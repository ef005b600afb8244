"""The backend a test runs on, chosen for the whole run: `pytest --backend=embedded|scale` (or
VOD_TEST_BACKEND; default embedded).

- embedded: what `vod up` uses out of the box. SQLite under the test's data directory, the
  filesystem store under it, no Redis.
- scale: PostgreSQL for metadata, queue and log (a private database, `vodtest_<pid>_…`, on the
  server at VOD_TEST_PG_URL; databases are pooled per run and their `public` schema dropped
  before every lease, so each test starts from an empty database like a fresh SQLite file,
  and the app creates the schema; dropped at the end of the run, or by the next run on this
  machine if this one died);
  Redis for the metadata cache, rate limits and playback events (a private DB number, 1-11,
  claimed across processes with SET NX in DB 0 and flushed); S3 on moto's server (one server per
  session, `tests/s3server.py`, a new bucket per lease, emptied and deleted after).

A test asks for the `backend` fixture (or a module fixture for `backends.lease()`) and builds
its settings with `backend.settings(data_dir, **overrides)`; processes it starts get the same
through `backend.env()` (VOD_* variables, read by `vodcore.config.load`). Whatever the backend,
read the object store through `read_object` / `local_tree` below, never through
`settings.store_dir`.

Services are never optional: under `--backend=scale` a PostgreSQL or Redis that does not answer
fails every test that needs it (once probed, with the reason), it never skips one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
from sqlalchemy import make_url

from tests.pgdb import PG_URL
from tests.s3server import AWS_ENV, REGION, S3Server, s3_server
from vodcore.config import Settings
from vodcore.store import ObjectStore
from vodcore.store.factory import close_store, make_store

T = TypeVar("T")

EMBEDDED = "embedded"
SCALE = "scale"
KINDS = (EMBEDDED, SCALE)
ENV_VAR = "VOD_TEST_BACKEND"
# DB numbers this suite leases (12 is the bench's)
REDIS_BASE_URL = os.environ.get("VOD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_DBS = (*range(1, 12), 13, 14, 15)  # 0 holds the leases
REDIS_LEASE_SECONDS = 6 * 3600
S3_PREFIX = "vod/"  # a shared-bucket layout, so the prefix handling runs too
DB_PREFIX = "vodtest_"
# The backend fields of Settings, each with its VOD_* variable (vodcore/config.py `_apply_env`).
ENV_NAMES = {
    "database_url": "VOD_DATABASE_URL",
    "redis_url": "VOD_REDIS_URL",
    "s3_bucket": "VOD_S3_BUCKET",
    "s3_endpoint_url": "VOD_S3_ENDPOINT_URL",
    "s3_region": "VOD_S3_REGION",
    "s3_prefix": "VOD_S3_PREFIX",
}


class BackendUnavailable(Exception):
    """A service the chosen backend needs does not answer."""


@dataclass
class Backend:
    """One test's (or one module's) private backend. `settings()` and `env()` hand it out."""

    kind: str
    database_url: str | None = None
    redis_url: str | None = None
    s3: S3Server | None = None  # the server, with this lease's own bucket
    s3_prefix: str = ""
    data_dirs: list[Path] = field(default_factory=list)  # what settings() was asked for

    @property
    def scale(self) -> bool:
        return self.kind == SCALE

    def overrides(self) -> dict[str, Any]:
        """The Settings fields that select this backend (for code that builds Settings itself,
        e.g. `LiveControl(data, **backend.overrides())`)."""
        return {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "s3_bucket": self.s3.bucket if self.s3 else None,
            "s3_endpoint_url": self.s3.endpoint_url if self.s3 else None,
            "s3_region": REGION if self.s3 else None,
            "s3_prefix": self.s3_prefix,
        }

    def settings(self, data_dir: Path, **overrides: Any) -> Settings:
        self.data_dirs.append(data_dir)
        return Settings(data_dir=data_dir, **{**self.overrides(), **overrides})

    def env(self) -> dict[str, str]:
        """VOD_* variables for a `vod` process (set empty when unused, so a developer's own
        VOD_DATABASE_URL etc. cannot leak into an embedded run), plus S3 test credentials."""
        env = {ENV_NAMES[k]: str(v or "") for k, v in self.overrides().items()}
        if self.s3:
            env.update(AWS_ENV)
        return env

    def check_nothing_embedded(self) -> None:
        """Scale: nothing fell back to the embedded defaults in a data dir handed out."""
        if not self.scale:
            return
        for d in self.data_dirs:
            assert not (d / "vod.db").exists(), f"{d}/vod.db: SQLite used under --backend=scale"
            assert not (d / "store").exists(), f"{d}/store: filesystem used under --backend=scale"


# --- reading the object store, whichever it is ----------------------------------------------------


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[ObjectStore]:
    store = make_store(settings)
    try:
        yield store
    finally:
        await close_store(store)


async def read_object(settings: Settings, key: str) -> bytes:
    async with open_store(settings) as store:
        return b"".join([chunk async for chunk in store.open_range(key)])


async def object_keys(settings: Settings, prefix: str) -> list[str]:
    async with open_store(settings) as store:
        return sorted(await store.list(prefix))


async def local_tree(settings: Settings, prefix: str, dest: Path) -> Path:
    """A local directory holding the objects under `prefix` (for ffmpeg, or reading files):
    the store's own directory on the filesystem, else a copy under `dest`."""
    assert prefix.endswith("/"), prefix
    async with open_store(settings) as store:
        local = store.local_path(prefix + "x")
        if local is not None:
            return local.parent
        for key in await store.list(prefix):
            out = dest / key[len(prefix) :]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"".join([c async for c in store.open_range(key)]))
    return dest


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from blocking code, in a thread of its own (safe whether
    or not the caller's thread has an event loop running)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# --- leasing -------------------------------------------------------------------------------------


def shown(url: str) -> str:
    """A service URL fit for a log line (no password)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _pg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Backends:
    """Hands out backends of one kind for a test session; see the module docstring."""

    def __init__(self, kind: str) -> None:
        assert kind in KINDS, kind
        self.kind = kind
        self._s3: S3Server | None = None
        self._stack = contextlib.ExitStack()
        self._free_dbs: list[str] = []
        self._made_dbs: list[str] = []
        self._numbers = itertools.count(1)
        self._token = uuid.uuid4().hex[:6]  # pids repeat across machines sharing a server
        self._redis: redis.Redis | None = None
        self._broken: str | None = None
        self._lock = threading.Lock()

    # PostgreSQL ---------------------------------------------------------------------------------
    async def _pg_admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(_pg_dsn(PG_URL), timeout=10)

    async def _sweep(self, conn: asyncpg.Connection) -> None:
        """Drop databases left by runs that died (their pid is gone); only for a local
        server, where the pid in the name means something."""
        if make_url(PG_URL).host not in ("127.0.0.1", "localhost", "::1"):
            return
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'vodtest\\_%'")
        for (name,) in rows:
            pid = name.removeprefix(DB_PREFIX).split("_")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _new_db(self) -> str:
        name = f"{DB_PREFIX}{os.getpid()}_{self._token}_{next(self._numbers)}"
        conn = await self._pg_admin()
        try:
            if not self._made_dbs:
                await self._sweep(conn)
            found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not found:
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self._made_dbs.append(name)
        return name

    @staticmethod
    async def _empty_db(url: str) -> None:
        """Whoever still holds a connection (a leaked pool) is cut off; the schema goes."""
        conn = await asyncpg.connect(_pg_dsn(url), timeout=10)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    async def _drop_dbs(self) -> None:
        if not self._made_dbs:
            return
        conn = await self._pg_admin()
        try:
            for name in self._made_dbs:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def _lease_db(self) -> str:
        with self._lock:
            name = self._free_dbs.pop() if self._free_dbs else None
        if name is None:
            name = run_sync(self._new_db)
        url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
        try:
            run_sync(lambda: self._empty_db(url))
        except BaseException:
            self._release_db(name)
            raise
        return name

    def _release_db(self, name: str) -> None:
        with self._lock:
            self._free_dbs.append(name)

    # Redis --------------------------------------------------------------------------------------
    def _redis_admin(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self._redis_url(0), socket_timeout=5, socket_connect_timeout=5
            )
        return self._redis

    def _lease_redis(self) -> int:
        admin, host = self._redis_admin(), os.uname().nodename
        me = f"{host}:{os.getpid()}"
        for n in REDIS_DBS:
            lease = f"vodtest:redis-db:{n}"
            taken = admin.set(lease, me, nx=True, ex=REDIS_LEASE_SECONDS)
            if not taken:  # a run on this machine that died without giving it back?
                held = admin.get(lease)
                owner, _, pid = (held.decode() if isinstance(held, bytes) else "").rpartition(":")
                if owner == host and pid.isdigit() and not _alive(int(pid)):
                    taken = admin.set(lease, me, ex=REDIS_LEASE_SECONDS)
            if taken:
                client = redis.Redis.from_url(self._redis_url(n), socket_timeout=5)
                try:
                    client.flushdb()
                finally:
                    client.close()
                return n
        raise BackendUnavailable(
            f"all Redis DBs ({', '.join(map(str, REDIS_DBS))}) are leased by other test runs"
        )

    def _release_redis(self, n: int) -> None:
        client = redis.Redis.from_url(self._redis_url(n), socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()
        self._redis_admin().delete(f"vodtest:redis-db:{n}")

    @staticmethod
    def _redis_url(n: int) -> str:
        """DB `n` on the server of REDIS_BASE_URL (a DB number in the URL wins over redis-py's
        `db=` argument, so the number goes into the URL)."""
        return urlunsplit(urlsplit(REDIS_BASE_URL)._replace(path=f"/{n}"))

    # S3 -----------------------------------------------------------------------------------------
    def s3_server(self) -> S3Server:
        """The session's moto server (started on first use, with a default bucket)."""
        if self._s3 is None:
            self._s3 = self._stack.enter_context(s3_server())
        return self._s3

    @staticmethod
    def _new_bucket(server: S3Server) -> S3Server:
        s3 = S3Server(server.endpoint_url, f"vodtest-{uuid.uuid4().hex[:12]}")
        s3.client().create_bucket(Bucket=s3.bucket)
        return s3

    @staticmethod
    def _drop_bucket(s3: S3Server) -> None:
        client = s3.client()
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=s3.bucket):
            for up in page.get("Uploads", []):
                client.abort_multipart_upload(
                    Bucket=s3.bucket, Key=up["Key"], UploadId=up["UploadId"]
                )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=s3.bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=s3.bucket)

    # leases -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def postgres(self) -> Iterator[str]:
        """The URL of a private, empty PostgreSQL database, whatever the run's kind: for tests
        that cover PostgreSQL themselves (`own_backends`) instead of dropping tables in the
        shared database at VOD_TEST_PG_URL under other runs' feet."""
        try:
            db = self._lease_db()
        except (OSError, asyncpg.PostgresError) as e:
            pytest.fail(
                f"PostgreSQL at {shown(PG_URL)} (VOD_TEST_PG_URL): {type(e).__name__}: {e}",
                pytrace=False,
            )
        try:
            yield make_url(PG_URL).set(database=db).render_as_string(False)
        finally:
            self._release_db(db)

    @contextlib.contextmanager
    def redis_db(self) -> Iterator[str]:
        """The URL of a private, flushed Redis DB, whatever the run's kind: for tests that cover
        Redis themselves, so that two runs on one machine never share a DB."""
        try:
            n = self._lease_redis()
        except (OSError, redis.RedisError, BackendUnavailable) as e:
            pytest.fail(
                f"Redis at {shown(REDIS_BASE_URL)} (VOD_TEST_REDIS_URL): {type(e).__name__}: {e}",
                pytrace=False,
            )
        try:
            yield self._redis_url(n)
        finally:
            self._release_redis(n)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Backend]:
        """A private backend for as long as the block runs; cleaned and given back after."""
        if self.kind == EMBEDDED:
            backend = Backend(EMBEDDED)
            yield backend
            return
        if self._broken:
            pytest.fail(self._broken, pytrace=False)
        with contextlib.ExitStack() as undo:
            try:
                db = self._lease_db()
                undo.callback(self._release_db, db)
                n = self._lease_redis()
                undo.callback(self._release_redis, n)
                s3 = self._new_bucket(self.s3_server())
                undo.callback(self._drop_bucket, s3)
            except (OSError, asyncpg.PostgresError, redis.RedisError, BackendUnavailable) as e:
                self._broken = (
                    f"--backend=scale needs PostgreSQL at {shown(PG_URL)} and Redis at"
                    f" {shown(REDIS_BASE_URL)} (VOD_TEST_PG_URL, VOD_TEST_REDIS_URL):"
                    f" {type(e).__name__}: {e}"
                )
                pytest.fail(self._broken, pytrace=False)
            backend = Backend(
                SCALE,
                database_url=make_url(PG_URL).set(database=db).render_as_string(False),
                redis_url=self._redis_url(n),
                s3=s3,
                s3_prefix=S3_PREFIX,
            )
            yield backend
            backend.check_nothing_embedded()

    def close(self) -> None:
        try:
            if self._made_dbs:
                run_sync(self._drop_dbs)
            if self._redis is not None:
                self._redis.close()
        finally:
            self._stack.close()
