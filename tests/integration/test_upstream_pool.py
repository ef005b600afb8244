"""UpstreamPool against real aiohttp servers on 127.0.0.1: active health checks noticing a
server that stops and comes back, the fallback concurrency cap as seen by the origin, and the
failover loop the engine runs (plan → slot → request → report → may_retry), including a shield
that accepts connections but never answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import yarl
from aiohttp import web
from prometheus_client import REGISTRY

from vodcore.cache import hrw
from vodcore.cache.breaker import BreakerPolicy, State
from vodcore.cache.upstreams import (
    Upstream,
    UpstreamPool,
    may_retry,
    response_ok,
)

pytestmark = pytest.mark.timeout(5)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """One aiohttp app on a loopback port that can be stopped and started again on that port."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay  # seconds before answering a media request
        self.hang = False  # accept and read requests, never answer them
        self.port = 0
        self.hits = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/{path:.*}", self._media)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # port 0 the first time
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._release = asyncio.Event()

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _media(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hang:
                await self._release.wait()
            await asyncio.sleep(self.delay)
            return web.Response(body=f"{self.name}:{request.path}".encode())
        finally:
            self.in_flight -= 1


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    started: list[Server] = []

    async def make(name: str, delay: float = 0.0) -> Server:
        s = Server(name, delay)
        await s.start()
        started.append(s)
        return s

    yield make
    for s in started:
        await s.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def wait_for(pred: Callable[[], bool], within: float) -> float:
    """Seconds until `pred()` held, polling every 10 ms; fails after `within` seconds."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def is_up(pool: UpstreamPool, base: str) -> bool:
    return next(s.up for s in pool.status() if s.upstream.base == base)


async def fetch(
    pool: UpstreamPool, session: aiohttp.ClientSession, key: str, max_attempts: int = 4
) -> tuple[Upstream, bytes]:
    """The engine's failover loop in miniature, the way the engine is meant to use the pool."""
    plan = pool.plan(key)
    if not plan:
        raise LookupError("no usable upstream")  # the engine answers 502 here
    sent_to_client = 0  # a buffering fill sends nothing to its client before the body is whole
    for attempt, up in enumerate(plan[:max_attempts], start=1):
        try:
            async with pool.slot(up):
                async with session.get(
                    yarl.URL(up.base + key, encoded=True), timeout=pool.client_timeout
                ) as resp:
                    body = await resp.read()
            pool.report(up, response_ok(resp.status))
            if response_ok(resp.status):
                return up, body
        except (aiohttp.ClientError, TimeoutError):
            pool.report(up, ok=False)
        if not may_retry("GET", sent_to_client, attempt, min(max_attempts, len(plan))):
            break
    raise LookupError("every attempt failed")


# --- Active health checks ----------------------------------------------------------------------


async def test_health_check_marks_a_stopped_server_down_and_a_restarted_one_up(
    servers: Callable[..., Awaitable[Server]], session: aiohttp.ClientSession
) -> None:
    shield = await servers("s1")
    interval = 0.1
    pool = UpstreamPool("itest-health", [shield.base], health_interval=interval, rise=2, fall=2)
    await pool.start(session)
    try:
        await asyncio.sleep(2.5 * interval)
        assert is_up(pool, shield.base)
        assert sample("vod_upstream_up", tier="itest-health", upstream=shield.base) == 1

        await shield.stop()
        took = await wait_for(lambda: not is_up(pool, shield.base), within=1.0)
        # fall=2: the next two checks fail; connection refused is immediate.
        assert took <= 2 * interval + 0.15, took
        assert sample("vod_upstream_up", tier="itest-health", upstream=shield.base) == 0
        assert pool.plan("/v/a") == []  # nothing else configured: fail fast

        await shield.start()  # same port
        took = await wait_for(lambda: is_up(pool, shield.base), within=1.0)
        assert took <= 2 * interval + 0.15, took
        assert [u.base for u in pool.plan("/v/a")] == [shield.base]
    finally:
        await pool.close()


async def test_health_check_times_out_on_a_hung_server(
    servers: Callable[..., Awaitable[Server]], session: aiohttp.ClientSession
) -> None:
    hung = await servers("hung")
    app_server = web.Application()

    async def slow_health(_request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    app_server.router.add_get("/healthz", slow_health)
    runner = web.AppRunner(app_server, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    slow_base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    pool = UpstreamPool(
        "itest-hung", [slow_base, hung.base], health_interval=0.1, health_timeout=0.1, fall=2
    )
    await pool.start(session)
    try:
        await wait_for(lambda: not is_up(pool, slow_base), within=1.5)
        assert is_up(pool, hung.base)
    finally:
        await pool.close()
        await runner.cleanup()


async def test_close_stops_the_checks(
    servers: Callable[..., Awaitable[Server]], session: aiohttp.ClientSession
) -> None:
    shield = await servers("s1")
    pool = UpstreamPool("itest-close", [shield.base], health_interval=0.05)
    await pool.start(session)
    await asyncio.sleep(0.1)
    await pool.close()
    await shield.stop()
    await asyncio.sleep(0.3)
    assert is_up(pool, shield.base)  # no check ran after close()
    await pool.close()  # idempotent


# --- The fallback cap --------------------------------------------------------------------------


async def test_fallback_cap_holds_under_ten_concurrent_fetches(
    servers: Callable[..., Awaitable[Server]], session: aiohttp.ClientSession
) -> None:
    origin = await servers("origin", delay=0.05)
    pool = UpstreamPool(
        "itest-cap", ["http://127.0.0.1:9"], fallback=[origin.base], fallback_concurrency=2
    )
    fb = pool.get(origin.base)
    inside = 0
    most = 0
    before = sample("vod_upstream_fallback_total", tier="itest-cap")

    async def user(i: int) -> bytes:
        nonlocal inside, most
        async with pool.slot(fb):
            inside += 1
            most = max(most, inside)
            try:
                async with session.get(f"{origin.base}/v/{i}") as resp:
                    return await resp.read()
            finally:
                inside -= 1

    bodies = await asyncio.gather(*(user(i) for i in range(10)))
    assert bodies == [f"origin:/v/{i}".encode() for i in range(10)]
    assert most == 2  # the cap was reached and never exceeded...
    assert origin.max_in_flight == 2  # ...as the origin itself saw it
    assert pool.fallback_in_flight == 0
    assert sample("vod_upstream_fallback_total", tier="itest-cap") - before == 10


# --- Failover ----------------------------------------------------------------------------------


async def test_a_dead_shield_fails_over_to_the_keys_second_choice_then_to_the_origin(
    servers: Callable[..., Awaitable[Server]], session: aiohttp.ClientSession
) -> None:
    s1, s2, origin = await servers("s1"), await servers("s2"), await servers("origin")
    policy = BreakerPolicy(failures=2, cooldown=30.0, max_cooldown=30.0)
    pool = UpstreamPool(
        "itest-failover", [s1.base, s2.base], fallback=[origin.base], breaker=policy
    )  # no start(): passive health only, so the breaker does the work
    keys = [f"/v/vid_{i}/seg.m4s" for i in range(40)]
    owners = {k: hrw.owner(k, [s1.base, s2.base]) for k in keys}

    # All up: every key lands on its HRW owner, the same one every time.
    for k in keys * 2:
        up, body = await fetch(pool, session, k)
        assert up.base == owners[k] and body.endswith(k.encode())
    assert origin.hits == 0

    # s1 dies: no request fails; s1's keys move to s2; after `failures` errors s1 is skipped.
    await s1.stop()
    for k in keys:
        up, _ = await fetch(pool, session, k)
        assert up.base == s2.base
    assert {s.upstream.base: s.breaker for s in pool.status()}[s1.base] is State.OPEN
    hits = s2.hits
    up, _ = await fetch(pool, session, next(k for k in keys if owners[k] == s1.base))
    assert up.base == s2.base and s2.hits == hits + 1
    assert origin.hits == 0

    # s2 dies too: the origin answers, without a single error on the way.
    await s2.stop()
    for k in keys:
        up, body = await fetch(pool, session, k)
        assert up.is_fallback and body == f"origin:{k}".encode()
    assert [u.base for u in pool.plan(keys[0])] == [origin.base]

    # And the origin as well: the plan is empty, the engine answers 502 at once.
    await origin.stop()
    for k in keys[:5]:
        with pytest.raises(LookupError):
            await fetch(pool, session, k)
    assert pool.plan(keys[0]) == []


async def test_a_shield_that_never_answers_times_out_and_fails_over(
    servers: Callable[..., Awaitable[Server]], session: aiohttp.ClientSession
) -> None:
    s1, s2 = await servers("s1"), await servers("s2")
    pool = UpstreamPool("itest-timeout", [s1.base, s2.base], read_timeout=0.2)
    key = next(f"/v/{i}" for i in range(100) if hrw.owner(f"/v/{i}", [s1.base, s2.base]) == s1.base)
    s1.hang = True
    t0 = time.monotonic()
    up, body = await fetch(pool, session, key)
    assert up.base == s2.base and body == f"s2:{key}".encode()
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert s1.hits == 1
