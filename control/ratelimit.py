"""Rate limits for the control API: a token bucket per API key and per client IP.

Rules:
- a bucket holds at most `capacity` tokens (the burst) and gains `rate` tokens per second; a
  request takes one token; with less than one token it is refused, and `retry_after` is how
  long until one token is back (`(cost - tokens) / rate` seconds);
- a bucket never seen (or expired) is full; a clock that goes backwards refills nothing;
- every request is charged to its client IP's bucket (`ip:{addr}`, aiohttp's `request.remote`:
  the peer, so behind a reverse proxy put that proxy's forwarded-header handling in front);
  a request with `Authorization: Bearer K` is also charged to `key:{sha256(K)[:32]}`, without a
  database read (a bad key is limited like a good one, and the raw key is never stored);
  the IP bucket is charged first, and a refusal there leaves the key bucket alone;
- a refusal is 429 `rate_limited` JSON with `Retry-After` in whole seconds, rounded up, at least
  1 (RFC 9110 §10.2.3: delay-seconds is an integer) and `retryAfterSeconds` exact in the body;
- exempt: `/healthz`, `/metrics`, and what the CDN's own tiers call on control (the purge stream
  and its acks, the JWKS, the cutoffs): limiting those would delay takedowns, not abuse;
- a rate of 0 (or less) turns that bucket off; with both off no middleware is installed at all;
- answers given outside aiohttp's middleware chain (`control.videos.PlaybackFastPath`) take
  the same buckets through `RateLimiter.check_now`, which needs no await and so only works
  when no enabled bucket is in Redis (`synchronous`); `install` lists every limiter under
  `RATE_LIMITERS_KEY` for them;
- backends: `MemoryBuckets` (this process; at most `max_keys` buckets, full or idle ones dropped
  first, then the least recently used: a dropped bucket comes back full, which only ever
  loosens the limit) and `RedisBuckets` (shared by every control process: one Lua script reads,
  refills, takes and writes a bucket atomically; its key expires once it would be full again).
  Redis is used when a Redis URL is configured. If Redis fails, requests are let through and
  the failure is logged (limits protect the service; they must not take it down).

`TokenBucket` is the pure policy: it takes `now` and does no I/O (STYLE.md habits 1 and 4).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from vodcore.errors import RATE_LIMITED, ApiError

log = logging.getLogger("vod.ratelimit")


EXEMPT_PATHS = (
    "/healthz",
    "/metrics",
    "/v1/purges/stream",
    "/v1/purges/acks",
    "/v1/keys/jwks.json",
    "/v1/cutoffs",
)


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    stamp: float  # when `tokens` was computed


@dataclass(frozen=True, slots=True)
class Rate:
    """`capacity` tokens at most (the burst), `per_second` tokens back each second."""

    capacity: float
    per_second: float

    def __post_init__(self) -> None:
        if self.per_second > 0 and self.capacity < 1:
            raise ValueError("capacity must be at least 1 token")

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    @property
    def full_after(self) -> float:
        """Seconds for an empty bucket to fill: an idle bucket older than this is full."""
        return self.capacity / self.per_second

    def step(self, bucket: Bucket | None, now: float, cost: float = 1.0) -> tuple[Bucket, float]:
        """The bucket after a request at `now`, and 0.0 if it was allowed or else the seconds
        until it would be. (`RedisBuckets.SCRIPT` is this function in Lua.)"""
        if bucket is None:
            tokens, stamp = self.capacity, now
        else:
            elapsed = max(0.0, now - bucket.stamp)  # a clock going back refills nothing
            tokens = min(self.capacity, bucket.tokens + elapsed * self.per_second)
            stamp = max(now, bucket.stamp)
        if tokens >= cost:
            return Bucket(tokens - cost, stamp), 0.0
        return Bucket(tokens, stamp), (cost - tokens) / self.per_second


class TokenBucket:
    """Buckets by key, in memory (pure: `now` is passed in)."""

    def __init__(self, capacity: float, rate: float, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = Rate(capacity, rate)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> tuple[bool, float]:
        """(allowed, retry_after seconds; 0.0 when allowed)."""
        if not self.rate.enabled:
            return True, 0.0
        bucket, retry = self.rate.step(self._buckets.pop(key, None), now)
        if len(self._buckets) >= self.max_keys:
            self._evict(now)
        self._buckets[key] = bucket
        return retry == 0.0, retry

    def _evict(self, now: float) -> None:
        full_after = self.rate.full_after
        for k in [k for k, b in self._buckets.items() if now - b.stamp >= full_after]:
            del self._buckets[k]  # full again: the same as absent
        while len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)


class Buckets(Protocol):
    """A rate-limit backend: take one token from `key`'s bucket. `take_now` does the same
    without awaiting, and only when `synchronous` (the buckets are not in Redis)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def synchronous(self) -> bool: ...

    async def take(self, key: str, now: float) -> tuple[bool, float]: ...

    def take_now(self, key: str, now: float) -> tuple[bool, float]: ...

    async def close(self) -> None: ...


class MemoryBuckets:
    def __init__(self, rate: Rate, max_keys: int = 100_000) -> None:
        self.buckets = TokenBucket(rate.capacity, rate.per_second, max_keys)

    @property
    def enabled(self) -> bool:
        return self.buckets.rate.enabled

    synchronous = True

    async def take(self, key: str, now: float) -> tuple[bool, float]:
        return self.buckets.take(key, now)

    def take_now(self, key: str, now: float) -> tuple[bool, float]:
        return self.buckets.take(key, now)

    async def close(self) -> None:
        return None


class RedisBuckets:
    """Buckets in Redis, as hashes `{prefix}{key}` with fields t (tokens) and s (stamp)."""

    # KEYS[1]: the bucket; ARGV: capacity, per_second, now, cost, ttl in ms.
    # Returns {allowed (1/0), retry_after as a string (Lua numbers become integers in replies)}.
    SCRIPT = """
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(b[1])
local stamp = tonumber(b[2])
if tokens == nil or stamp == nil then
  tokens = cap
  stamp = now
else
  local elapsed = now - stamp
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(cap, tokens + elapsed * rate)
  if now > stamp then stamp = now end
end
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
else
  retry = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if retry == 0 then return {1, '0'} end
return {0, string.format('%.17g', retry)}
"""

    def __init__(self, client: Any, rate: Rate, prefix: str = "vod:rl:") -> None:
        self.client = client  # redis.asyncio.Redis
        self.rate = rate
        self.prefix = prefix
        self.ttl_ms = math.ceil(rate.full_after * 1000) + 1000 if rate.enabled else 1000
        self._script = client.register_script(self.SCRIPT)

    @property
    def enabled(self) -> bool:
        return self.rate.enabled

    @property
    def synchronous(self) -> bool:
        return not self.rate.enabled  # off: nothing to ask Redis

    def take_now(self, key: str, now: float) -> tuple[bool, float]:
        if self.rate.enabled:
            raise RuntimeError("a bucket in Redis is taken with `take`")
        return True, 0.0

    async def take(self, key: str, now: float) -> tuple[bool, float]:
        if not self.rate.enabled:
            return True, 0.0
        args = [repr(self.rate.capacity), repr(self.rate.per_second), repr(now), "1", self.ttl_ms]
        allowed, retry = await self._script(keys=[self.prefix + key], args=args)
        return int(allowed) == 1, float(retry)

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    redis_url: str | None = None
    key_per_second: float = 20.0
    key_burst: float = 100.0
    ip_per_second: float = 50.0
    ip_burst: float = 200.0
    exempt: tuple[str, ...] = EXEMPT_PATHS

    @classmethod
    def from_settings(cls, settings: Any) -> RateLimitConfig:
        """From `vodcore.config.Settings` (fields `redis_url`, `rate_limit_*`; defaults here
        for any it does not have)."""
        d = cls()
        return cls(
            redis_url=getattr(settings, "redis_url", None) or None,
            key_per_second=float(getattr(settings, "rate_limit_key_per_second", d.key_per_second)),
            key_burst=float(getattr(settings, "rate_limit_key_burst", d.key_burst)),
            ip_per_second=float(getattr(settings, "rate_limit_ip_per_second", d.ip_per_second)),
            ip_burst=float(getattr(settings, "rate_limit_ip_burst", d.ip_burst)),
        )


def bearer_bucket(authorization: str) -> str | None:
    """The key bucket's name for an `Authorization` header, or None without a bearer key."""
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]


class RateLimiter:
    def __init__(
        self,
        per_key: Buckets,
        per_ip: Buckets,
        exempt: Iterable[str] = EXEMPT_PATHS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.per_key = per_key
        self.per_ip = per_ip
        self.exempt = frozenset(exempt)
        self.clock = clock
        self._last_failure_log = -math.inf
        self.installed: Callable[..., Awaitable[web.StreamResponse]] | None = None

    @property
    def enabled(self) -> bool:
        """Whether any bucket limits anything (a rate of 0 turns a bucket off)."""
        return self.per_key.enabled or self.per_ip.enabled

    @property
    def synchronous(self) -> bool:
        """Whether `check_now` can answer: no enabled bucket is in Redis."""
        return self.per_key.synchronous and self.per_ip.synchronous

    def check_now(self, remote: str | None, authorization: str) -> float:
        """`check` without awaiting, only when `synchronous`: for answers given outside
        aiohttp's handler chain (`control.videos.PlaybackFastPath`)."""
        if not self.synchronous:
            raise RuntimeError("a bucket is in Redis: use `check`")
        now = self.clock()
        ok, retry = self.per_ip.take_now(f"ip:{remote or 'unknown'}", now)
        if not ok:
            return retry
        key = bearer_bucket(authorization)
        if key is not None:
            ok, retry = self.per_key.take_now(key, now)
            if not ok:
                return retry
        return 0.0

    async def check(self, remote: str | None, authorization: str) -> float:
        """0.0 when the request may go on, else the seconds to wait."""
        now = self.clock()
        try:
            ok, retry = await self.per_ip.take(f"ip:{remote or 'unknown'}", now)
            if not ok:
                return retry
            key = bearer_bucket(authorization)
            if key is not None:
                ok, retry = await self.per_key.take(key, now)
                if not ok:
                    return retry
        except Exception:  # Redis down or slow: fail open, and say so (not on every request)
            mono = time.monotonic()
            if mono - self._last_failure_log >= 10.0:
                self._last_failure_log = mono
                log.exception("rate-limit backend failed; letting requests through")
        return 0.0

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def rate_limit(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            if request.path not in self.exempt:
                retry = await self.check(request.remote, request.headers.get("Authorization", ""))
                if retry > 0:
                    raise ApiError(
                        RATE_LIMITED,
                        headers={"Retry-After": str(max(1, math.ceil(retry)))},
                        extra={"retryAfterSeconds": round(retry, 3)},
                    )
            return await handler(request)

        return rate_limit

    async def close(self) -> None:
        await self.per_key.close()
        if self.per_ip is not self.per_key:
            await self.per_ip.close()


def make_limiter(config: RateLimitConfig, clock: Callable[[], float] = time.time) -> RateLimiter:
    key_rate = Rate(config.key_burst, config.key_per_second)
    ip_rate = Rate(config.ip_burst, config.ip_per_second)
    if config.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(config.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return RateLimiter(
            RedisBuckets(client, key_rate),
            _SharedClient(RedisBuckets(client, ip_rate)),
            config.exempt,
            clock,
        )
    return RateLimiter(MemoryBuckets(key_rate), MemoryBuckets(ip_rate), config.exempt, clock)


class _SharedClient:
    """The IP buckets share the key buckets' Redis client: closing is the key buckets' job."""

    def __init__(self, inner: RedisBuckets) -> None:
        self.inner = inner

    @property
    def enabled(self) -> bool:
        return self.inner.enabled

    @property
    def synchronous(self) -> bool:
        return self.inner.synchronous

    async def take(self, key: str, now: float) -> tuple[bool, float]:
        return await self.inner.take(key, now)

    def take_now(self, key: str, now: float) -> tuple[bool, float]:
        return self.inner.take_now(key, now)

    async def close(self) -> None:
        return None


RATE_LIMITERS_KEY: web.AppKey[list[RateLimiter]] = web.AppKey("rate_limiters", list)


def install(
    app: web.Application, config: RateLimitConfig, clock: Callable[[], float] = time.time
) -> RateLimiter:
    """Add the rate-limit middleware to `app` (inside its error middleware, so a refusal is
    JSON; none when both rates are off) and close the backend on cleanup. Call before the app
    starts. The limiter is listed under `RATE_LIMITERS_KEY` (its middleware as `installed`),
    for fast responders that answer outside the middleware chain and must apply it
    themselves."""
    limiter = make_limiter(config, clock)
    if limiter.enabled:  # both rates off: no middleware to run on every request
        limiter.installed = limiter.middleware()
        app.middlewares.append(limiter.installed)
    app.setdefault(RATE_LIMITERS_KEY, []).append(limiter)

    async def close(_app: web.Application) -> None:
        await limiter.close()

    app.on_cleanup.append(close)
    return limiter
