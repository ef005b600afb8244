"""`vod keys list` and `vod keys revoke`: API keys beside `vod keys create` (issue 11).

Both work on the data directory's database directly, as `vod keys create` does (an operator on
the machine needs no key to manage keys: it is how a lost or leaked operator key is revoked):

    vod keys list --data DIR            # id, role, created, revoked (never the key or its hash)
    vod keys revoke --data DIR KEYID    # refused (401) by every control process at once

The API does the same over HTTP (`GET /v1/api-keys`, `DELETE /v1/api-keys/{keyId}`,
`control.apikeys`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any


def _engine(args: argparse.Namespace) -> Any:
    from vodcore import config
    from vodcore.db.engine import make_engine

    s = config.load(getattr(args, "config", None), data_dir=getattr(args, "data", None))
    s.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(s.db_url)


def cmd_keys_list(args: argparse.Namespace) -> int:
    from control.apikeys import key_json, list_keys
    from vodcore.db.engine import create_schema

    async def main() -> list[dict[str, Any]]:
        engine = _engine(args)
        try:
            await create_schema(engine)
            async with engine.connect() as conn:
                return [key_json(r) for r in await list_keys(conn)]
        finally:
            await engine.dispose()

    rows = asyncio.run(main())
    print(f"{'KEY ID':<22} {'ROLE':<9} {'CREATED':<21} REVOKED")
    for k in rows:
        print(f"{k['keyId']:<22} {k['role']:<9} {k['createdAt'][:19]:<21} {k['revokedAt'] or '-'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from control.apikeys import key_json, revoke_key
    from control.ids import is_id
    from vodcore.db.engine import create_schema

    if not is_id(args.key_id, "key"):
        print(f"vod: not an API key id: {args.key_id!r} (ids look like key_…)", file=sys.stderr)
        return 2

    async def main() -> dict[str, Any] | None:
        engine = _engine(args)
        try:
            await create_schema(engine)
            async with engine.begin() as conn:
                row = await revoke_key(conn, args.key_id, time.time())
            return key_json(row) if row is not None else None
        finally:
            await engine.dispose()

    doc = asyncio.run(main())
    if doc is None:
        print(f"vod: no such API key: {args.key_id}", file=sys.stderr)
        return 1
    print(f"{doc['keyId']} revoked at {doc['revokedAt']}")
    return 0


def add_key_parsers(ksub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds the key actions beyond `create` to the `vod keys` sub-parsers."""
    kl = ksub.add_parser("list", help="list API keys: id, role, created, revoked")
    common(kl)
    kl.set_defaults(func=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke an API key (refused at once everywhere)")
    common(kr)
    kr.add_argument("key_id", metavar="KEYID", help="the key's id (from `vod keys list`)")
    kr.set_defaults(func=cmd_keys_revoke)
