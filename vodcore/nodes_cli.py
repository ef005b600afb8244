"""`vod nodes create|list|revoke`: the node credentials edges, shields and origins present to
control's node endpoints (`control.nodes_credentials`), and what `vod up` provisions for its
own tiers (`provision`).

Rotation: `vod nodes create` a new one, deploy it (`node_credential` / VOD_NODE_CREDENTIAL) on
the nodes, then `vod nodes revoke` the old one; its open purge streams end within one keep-alive
ping (10 s) and its further calls are 403.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from vodcore import config

CREDENTIAL_FILE = "node-credential"  # in DATA: `vod up`'s own tiers' credential (0600)


def _settings(args: argparse.Namespace) -> config.Settings:
    return config.load(getattr(args, "config", None), data_dir=getattr(args, "data", None))


async def _with_db(s: config.Settings, work: Callable[[Any], Any]) -> Any:
    from vodcore.db.engine import create_schema, make_engine

    s.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(s.db_url)
    try:
        await create_schema(engine)
        async with engine.begin() as conn:
            return await work(conn)
    finally:
        await engine.dispose()


def provision(s: config.Settings) -> str:
    """The node credential of `vod up`'s own tiers: the one kept in DATA while control still
    knows it unrevoked, else a new one (tier `any`) written there, readable by the owner only."""
    from control import nodes_credentials

    path = s.data_dir / CREDENTIAL_FILE
    try:
        kept = path.read_text().strip()
    except OSError:
        kept = ""

    async def work(conn: Any) -> str:
        if kept:
            cred = await nodes_credentials.find(conn, kept)
            if cred is not None and cred.revoked_at is None:
                return kept
        _cred, secret = await nodes_credentials.create(conn, "any", time.time(), "vod up")
        return secret

    secret: str = asyncio.run(_with_db(s, work))
    if secret != kept:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
    return secret


def cmd_create(args: argparse.Namespace) -> int:
    from control import nodes_credentials

    async def work(conn: Any) -> str:
        _cred, secret = await nodes_credentials.create(conn, args.tier, time.time(), args.name)
        return secret

    if len(args.name) > 80:
        print("vod: --name: at most 80 characters", file=sys.stderr)
        return 2
    print(asyncio.run(_with_db(_settings(args), work)))
    return 0


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_list(args: argparse.Namespace) -> int:
    from control import nodes_credentials

    creds = asyncio.run(_with_db(_settings(args), nodes_credentials.listing))
    print(f"{'ID':<22} {'TIER':<7} {'CREATED':<21} {'REVOKED':<21} NAME")
    for c in creds:
        print(f"{c.id:<22} {c.tier:<7} {_iso(c.created_at):<21} {_iso(c.revoked_at):<21} {c.name}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from control import nodes_credentials

    async def work(conn: Any) -> bool:
        return await nodes_credentials.revoke(conn, args.id, time.time())

    if not asyncio.run(_with_db(_settings(args), work)):
        print(f"vod: no unrevoked node credential {args.id}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0


def add_nodes_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """`vod nodes …` under the `vod` parser's sub-commands."""
    nodes = sub.add_parser("nodes", help="node credentials (edges, shields, origins → control)")
    nsub = nodes.add_subparsers(dest="nodes_command", required=True, metavar="ACTION")
    nc = nsub.add_parser("create", help="create a node credential and print it (shown once)")
    common(nc)
    nc.add_argument("--tier", choices=("edge", "shield", "origin", "any"), required=True)
    nc.add_argument("--name", default="", help="a note: where it is deployed")
    nc.set_defaults(func=cmd_create)
    nl = nsub.add_parser("list", help="list node credentials (never their secrets)")
    common(nl)
    nl.set_defaults(func=cmd_list)
    nr = nsub.add_parser("revoke", help="revoke a node credential by id (403 from then on)")
    common(nr)
    nr.add_argument("id")
    nr.set_defaults(func=cmd_revoke)
