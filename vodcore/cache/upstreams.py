"""Upstream selection for a cache tier: which upstream to ask for a key, and in what order.

An edge spreads its keys over several shields by rendezvous hashing (`hrw`), so one key always
lands on the same shield and that shield's cache is effective. Each upstream has a circuit
breaker fed by real request outcomes (passive health, `breaker`) and, optionally, an active
health check. When no shield is usable the edge goes to the fallback (the origin) directly,
with a cap on concurrent fallback fetches so an outage of the shield tier does not turn into a
stampede on the origin.

Rules:
- An upstream is *usable* when its health check last said up (upstreams start up: an edge
  must not send its first seconds of traffic to the origin) and its breaker allows a request.
- `plan(key)` = the usable primaries in HRW order for `key`, then the usable fallbacks in
  configured order. The fallback is reached only by a request for which every usable primary
  has failed, or at once when no primary is usable. Unhealthy or open primaries are never in a
  plan, not even as a last resort: the fallback is the last resort. (Putting the fallback at the
  tail rather than only "when no primary is usable" covers the seconds before health checks and
  breakers notice that the shields died: those requests still reach the origin, under the cap.)
- Nothing usable at all (every primary and every fallback down or open) gives an empty plan:
  the engine answers 502 at once, which lets stale-if-error serve what the cache holds, instead
  of every request waiting on connect timeouts to hosts already known dead.
- A breaker that is not CLOSED (probing after its cool-down) is only consulted when its upstream
  would be the first entry of the plan, so the single probe it grants goes to the upstream the
  engine actually tries first; elsewhere it is left out without using up the probe.
- Health: `fall` consecutive failed checks mark an upstream down, `rise` consecutive good ones
  mark it up again (hysteresis, so one slow check under load does not flap it). A check is good
  when GET `{base}{health_path}` answers below 500 within `health_timeout`. `health_path=None`
  disables active checks (for a foreign upstream that has no /healthz); breakers still work.
- Retries (`may_retry`): only GET and HEAD, only before any byte (headers included) went to the
  client, and within the attempt budget.
- Policy is pure (`now` passed in); the only I/O here is the health-check loop and the
  semaphore of `slot`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import yarl
from prometheus_client import Counter, Gauge

from vodcore.cache import hrw
from vodcore.cache.breaker import BreakerPolicy, CircuitBreaker, State

log = logging.getLogger("vod.upstreams")

UPSTREAM_UP = Gauge(
    "vod_upstream_up", "1 when the upstream's health check says up", ["tier", "upstream"]
)
UPSTREAM_BREAKER = Gauge(
    "vod_upstream_breaker_state",
    "Circuit breaker state: 0 closed, 1 open, 2 half-open",
    ["tier", "upstream"],
)
UPSTREAM_FALLBACK = Counter(
    "vod_upstream_fallback_total", "Fetches sent to a fallback upstream (the origin)", ["tier"]
)

# RFC 9110 §9.2.2 allows retrying idempotent requests automatically; of those, a proxy can only
# replay requests without a body it may already have consumed, hence GET and HEAD.
RETRYABLE_METHODS = frozenset({"GET", "HEAD"})
# Answers that say "this upstream itself is in trouble" (RFC 9110 §15.6.1, §15.6.4). A 502/504
# from a shield means *its* upstream failed and says nothing about the shield.
FAILURE_STATUSES = frozenset({500, 503})


# Pure policy ------------------------------------------------------------------------------------
def may_retry(method: str, bytes_sent_to_client: int, attempt: int, max_attempts: int) -> bool:
    """May a failed attempt be retried on the next upstream of the plan?

    `attempt` is the 1-based number of the attempt that just failed; `bytes_sent_to_client`
    counts everything written to the client for this request, headers included: once a status
    line went out, a second upstream's answer cannot replace it (the only honest signal left is
    cutting the connection).
    """
    return (
        method.upper() in RETRYABLE_METHODS and bytes_sent_to_client == 0 and attempt < max_attempts
    )


def response_ok(status: int) -> bool:
    """What to `report` for an upstream that answered with `status` (passive health)."""
    return status not in FAILURE_STATUSES


@dataclass(slots=True)
class HealthState:
    """Up/down with hysteresis: `fall` failed checks in a row → down, `rise` good ones → up."""

    rise: int = 2
    fall: int = 2
    up: bool = True
    streak: int = 0  # consecutive checks contradicting `up`

    def observe(self, ok: bool) -> bool:
        """Record one check; True when `up` changed."""
        if ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (self.rise if ok else self.fall):
            self.up = ok
            self.streak = 0
            return True
        return False


# The pool ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Upstream:
    base: str  # scheme://host:port[/prefix], no trailing slash
    is_fallback: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    upstream: Upstream
    up: bool
    breaker: State


@dataclass(slots=True)
class _Member:
    upstream: Upstream
    breaker: CircuitBreaker
    health: HealthState


class UpstreamPool:
    def __init__(
        self,
        tier: str,
        upstreams: list[str],
        *,
        fallback: list[str] | None = None,
        fallback_concurrency: int = 8,
        health_interval: float = 2.0,
        health_timeout: float = 1.0,
        health_path: str | None = "/healthz",
        rise: int = 2,
        fall: int = 2,
        breaker: BreakerPolicy | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        primaries = [u.rstrip("/") for u in upstreams]
        fallbacks = [u.rstrip("/") for u in fallback or []]
        if not primaries:
            raise ValueError(f"{tier}: at least one upstream is required")
        if len(set(primaries + fallbacks)) != len(primaries) + len(fallbacks):
            raise ValueError(f"{tier}: an upstream is listed twice: {primaries + fallbacks}")
        if fallback_concurrency < 1 or health_interval <= 0 or health_timeout <= 0:
            raise ValueError("fallback_concurrency >= 1, health_interval and timeout > 0")
        self.tier = tier
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.health_path = health_path
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.clock = clock
        policy = breaker or BreakerPolicy()
        self._members: dict[Upstream, _Member] = {}
        for base, is_fallback in [(b, False) for b in primaries] + [(b, True) for b in fallbacks]:
            up = Upstream(base, is_fallback)
            self._members[up] = _Member(up, CircuitBreaker(policy), HealthState(rise, fall))
            UPSTREAM_UP.labels(tier, base).set(1)
            UPSTREAM_BREAKER.labels(tier, base).set(State.CLOSED)
        self._by_base = {m.upstream.base: m.upstream for m in self._members.values()}
        self._primaries = primaries
        self._fallbacks = [self._by_base[b] for b in fallbacks]
        self._fallback_slots = asyncio.Semaphore(fallback_concurrency)
        self._fallback_in_flight = 0
        self._tasks: list[asyncio.Task[None]] = []

    # Lifecycle ----------------------------------------------------------------------------------
    async def start(self, session: aiohttp.ClientSession) -> None:
        """Start one health-check task per upstream (none when `health_path` is None)."""
        if self._tasks or self.health_path is None:
            return
        for up in self._members:
            task = asyncio.create_task(self._check_loop(session, up), name=f"health {up.base}")
            self._tasks.append(task)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # Selection ----------------------------------------------------------------------------------
    def plan(self, key: str) -> list[Upstream]:
        """Upstreams to try for `key`, in order (see the module rules); may be empty."""
        now = self.clock()
        ranked = [self._by_base[b] for b in hrw.rank(key, self._primaries)]
        out: list[Upstream] = []
        for up in ranked + self._fallbacks:
            m = self._members[up]
            if not m.health.up:
                continue
            if m.breaker.state is State.CLOSED:
                out.append(up)
            elif not out:  # recovering: may take the probe only as the first choice
                before = m.breaker.state
                if m.breaker.allow(now):
                    out.append(up)
                if m.breaker.state is not before:
                    self._breaker_changed(m, before)
        return out

    def report(self, upstream: Upstream, ok: bool) -> None:
        """Passive health: the outcome of one request to `upstream`, for its breaker."""
        m = self._members[upstream]
        before = m.breaker.state
        if ok:
            m.breaker.record_success(self.clock())
        else:
            m.breaker.record_failure(self.clock())
        if m.breaker.state is not before:
            self._breaker_changed(m, before)

    @contextlib.asynccontextmanager
    async def slot(self, upstream: Upstream) -> AsyncIterator[None]:
        """Hold around a whole fetch (headers and body) from `upstream`.

        For a fallback this waits for one of `fallback_concurrency` slots shared by all
        fallbacks of the pool; for a primary it does nothing.
        """
        if not upstream.is_fallback:
            yield
            return
        async with self._fallback_slots:
            self._fallback_in_flight += 1
            UPSTREAM_FALLBACK.labels(self.tier).inc()
            try:
                yield
            finally:
                self._fallback_in_flight -= 1

    @property
    def client_timeout(self) -> aiohttp.ClientTimeout:
        """Timeouts for one attempt: a short connect so failover to the next upstream is quick;
        `read_timeout` bounds both the wait for the response headers and every stall in the
        body; no total, since a large body may legitimately take long."""
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout
        )

    # Introspection ------------------------------------------------------------------------------
    @property
    def upstreams(self) -> list[Upstream]:
        return list(self._members)

    @property
    def fallback_in_flight(self) -> int:
        return self._fallback_in_flight

    def get(self, base: str) -> Upstream:
        return self._by_base[base.rstrip("/")]

    def status(self) -> list[UpstreamStatus]:
        return [
            UpstreamStatus(m.upstream, m.health.up, m.breaker.state) for m in self._members.values()
        ]

    # Health checks ------------------------------------------------------------------------------
    async def _check_loop(self, session: aiohttp.ClientSession, up: Upstream) -> None:
        while True:
            self.observe_health(up, await self._check(session, up))
            await asyncio.sleep(self.health_interval)

    async def _check(self, session: aiohttp.ClientSession, up: Upstream) -> bool:
        assert self.health_path is not None
        url = yarl.URL(up.base + self.health_path, encoded=True)
        try:
            async with session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=self.health_timeout),
                allow_redirects=False,
            ) as resp:
                await resp.read()  # tiny; reading it lets the connection be reused
                # Alive = answers HTTP without a server error: our tiers' /healthz says 503
                # while starting, and a foreign origin's 404 for /healthz is still "up".
                return resp.status < 500
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
        except Exception:  # a bug here must not kill the loop and freeze the state
            log.exception("%s: health check of %s crashed", self.tier, up.base)
            return False

    def observe_health(self, upstream: Upstream, ok: bool) -> None:
        """One active health-check result (public so a caller may feed its own checks)."""
        m = self._members[upstream]
        if m.health.observe(ok):
            UPSTREAM_UP.labels(self.tier, upstream.base).set(1 if m.health.up else 0)
            log.warning(
                "%s: upstream %s is %s", self.tier, upstream.base, "up" if m.health.up else "down"
            )

    def _breaker_changed(self, m: _Member, before: State) -> None:
        after = m.breaker.state
        UPSTREAM_BREAKER.labels(self.tier, m.upstream.base).set(after)
        level = logging.WARNING if after is State.OPEN else logging.INFO
        log.log(
            level, "%s: breaker of %s %s -> %s", self.tier, m.upstream.base, before.name, after.name
        )
