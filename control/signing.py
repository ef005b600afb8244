"""Signing-key rotation and revocation (issue 4), operator only.

- `POST /v1/keys/rotate`: a new key signs every token from now on; the old ones stay published,
  so tokens already handed out keep playing (rotation without downtime).
- `DELETE /v1/keys/{kid}`: the key leaves the published set, and a `keys` entry on the purge
  log makes every edge refetch the set at once, so its tokens are refused everywhere.
Both are recorded in the event log.
"""

from __future__ import annotations

import time

from aiohttp import web

from control.auth import authenticate
from control.purges import Purges
from vodcore.db.videos import append_event
from vodcore.errors import NOT_FOUND, ApiError
from vodcore.tokens import SigningKeys


class Signing:
    def __init__(self, purges: Purges, keys: SigningKeys) -> None:
        self.purges = purges
        self.keys = keys
        self.engine = purges.engine

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/keys/rotate", self.rotate)
        app.router.add_delete("/v1/keys/{kid}", self.revoke)

    async def _announce(self, action: str, kid: str, actor: str) -> int:
        now = time.time()
        async with self.purges._write, self.engine.begin() as conn:
            await append_event(conn, f"keys.{action}", None, {"kid": kid, "by": actor}, now)
            entry = await self.purges.append(conn, "none", (), False, actor, now, action="keys")
        self.purges.published(entry)
        return entry.seq

    async def rotate(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request, roles=("operator",))
        kid = self.keys.rotate()
        seq = await self._announce("rotated", kid, principal.key_id)
        return web.json_response({"kid": kid, "published": sorted(self.keys.keys), "seq": seq})

    async def revoke(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request, roles=("operator",))
        kid = request.match_info["kid"]
        try:
            self.keys.revoke(kid)
        except KeyError:
            raise ApiError(NOT_FOUND, "no such signing key") from None
        seq = await self._announce("revoked", kid, principal.key_id)
        return web.json_response({"revoked": kid, "signing": self.keys.current_kid, "seq": seq})
