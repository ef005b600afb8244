"""The edge's copy of control's public token keys (a JWKS), refreshed lazily.

Rules:
- keys are fetched on first need, and again when a token names a kid the edge does not hold,
  but never more than once per `min_interval` seconds (so forged kids cannot flood control);
- a failed fetch keeps the keys already held; with no key at all the edge answers 503;
- a successful fetch replaces the set, so a key control stops publishing (revoked) is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vodcore.errors import UNAVAILABLE, ApiError
from vodcore.tokens import keys_from_jwks

log = logging.getLogger("vod.edge.keys")


def should_refresh(
    held: bool, kid_known: bool, last_fetch: float | None, now: float, min_interval: float
) -> bool:
    """Pure: fetch the JWKS now?"""
    if held and kid_known:
        return False
    return last_fetch is None or now - last_fetch >= min_interval


class KeyRing:
    def __init__(
        self,
        jwks_url: str,
        *,
        min_interval: float = 5.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jwks_url = jwks_url
        self.min_interval = min_interval
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self.keys: dict[str, Ed25519PublicKey] = {}
        self._last_fetch: float | None = None
        self._lock = asyncio.Lock()

    async def keys_for(
        self, session: aiohttp.ClientSession, kid: str | None
    ) -> dict[str, Ed25519PublicKey]:
        """The keys to verify a token naming `kid` with; raises ApiError(503) if none known."""
        if kid is None or kid not in self.keys:
            async with self._lock:  # one fetch at a time; later arrivals see its result
                known = kid is None or kid in self.keys
                if should_refresh(
                    bool(self.keys), known, self._last_fetch, self.clock(), self.min_interval
                ):
                    self._last_fetch = self.clock()
                    await self._fetch(session)
        if not self.keys:
            raise ApiError(UNAVAILABLE, "token keys are not available yet")
        return self.keys

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        """Fetch the key set now (control said it changed: a rotation or a revocation)."""
        async with self._lock:
            self._last_fetch = self.clock()
            await self._fetch(session)

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(
                self.jwks_url, timeout=aiohttp.ClientTimeout(total=self.timeout_seconds)
            ) as resp:
                if resp.status != 200:
                    log.warning("JWKS fetch from %s: HTTP %d", self.jwks_url, resp.status)
                    return
                doc = await resp.json(content_type=None)
            keys = keys_from_jwks(doc if isinstance(doc, dict) else {})
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("JWKS fetch from %s failed: %r", self.jwks_url, e)
            return
        except Exception as e:  # a malformed JWK inside the set (PyJWT raises its own types)
            log.warning("JWKS from %s unusable: %r", self.jwks_url, e)
            return
        self.keys = keys
