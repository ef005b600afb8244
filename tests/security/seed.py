"""What the security suites set up the same way: a control with rate limits off, API keys and
video rows owned by one of them (tenancy, views, keys); servers on free loopback ports and a
control that only publishes the signing keys (the tier suites)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from control.auth import create_key, hash_key
from tests.backends import Backend
from vodcore.config import Settings
from vodcore.db.schema import api_keys, videos
from vodcore.server import start_server
from vodcore.tokens import SigningKeys


def quiet_settings(backend: Backend, tmp_path: Path) -> Settings:
    """The backend's settings with rate limits off (these suites count, they do not flood)."""
    settings = backend.settings(
        tmp_path / "data", rate_limit_ip_per_second=0, rate_limit_key_per_second=0
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


async def new_key(conn: AsyncConnection, role: str) -> tuple[str, str]:
    """(the key, its id)."""
    key = await create_key(conn, role, 0.0)
    kid = await conn.execute(select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(key)))
    return key, kid.scalar_one()


async def add_videos(
    conn: AsyncConnection, owner_id: str, rows: Iterable[tuple[str, str, str]]
) -> None:
    """One video per (id, visibility, state), version 1, owned by `owner_id`."""
    for vid, visibility, state in rows:
        await conn.execute(
            videos.insert().values(
                id=vid, owner_key_id=owner_id, title="t", description="",
                visibility=visibility, state=state, current_version=1,
                created_at=0.0, updated_at=0.0,
            )
        )  # fmt: skip


async def serve(app: web.Application, runners: list[web.AppRunner]) -> str:
    """`app` on a free loopback port (its runner appended to `runners`, to clean up); its URL."""
    runner = await start_server(app, "127.0.0.1", 0, access_log=False)
    runners.append(runner)
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


def jwks_only_control(keys: SigningKeys) -> web.Application:
    """A stand-in control that serves the public signing keys and nothing else."""

    async def jwks(_request: web.Request) -> web.Response:
        return web.json_response(keys.jwks())

    app = web.Application()
    app.router.add_get("/v1/keys/jwks.json", jwks)
    return app
