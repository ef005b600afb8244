"""A creator's own videos (`GET /v1/me/videos?limit=&cursor=`): keyset pagination.

Rules:
- the videos whose `owner_key_id` is the caller's key, newest first: ordered by
  (created_at DESC, id DESC), so two videos created in the same instant still have one order;
- deleted videos are left out (they are gone for their owner too); every other state is
  listed, blocked ones included, so a creator can see what happened to a video;
- `limit` is an integer 1..`MAX_LIMIT` (default `DEFAULT_LIMIT`);
- the cursor is opaque to clients: URL-safe base64 (unpadded) of the JSON `[created_at, id]`
  of the last video of the previous page; the next page starts strictly after it. It comes
  back as `nextCursor`, null on the last page. A cursor stays valid while videos are added
  (new ones sort before it) or removed; it is not tied to a key (it only positions a scan of
  the caller's own videos);
- a malformed limit or cursor is 400 `bad_request`, never a 500;
- the scan uses the index on (owner_key_id, created_at) (`vodcore.db.schema`), and reads
  `limit + 1` rows to know whether there is a next page.
Cursor coding and query parsing are pure; `owner_page` is the one database read.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence

import orjson
from sqlalchemy import and_, or_, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from control.ids import is_id
from vodcore.db.schema import videos
from vodcore.errors import BAD_REQUEST, ApiError
from vodcore.lifecycle import State

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_CURSOR = 200  # characters: far above any cursor this module writes

Position = tuple[float, str]  # (created_at, video id)


def encode_cursor(pos: Position) -> str:
    raw = orjson.dumps([pos[0], pos[1]])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> Position:
    bad = ApiError(BAD_REQUEST, "cursor: not a cursor this API returned", extra={"field": "cursor"})
    if not cursor or len(cursor) > MAX_CURSOR:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        doc = orjson.loads(raw)
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise bad from None
    if (
        not isinstance(doc, list)
        or len(doc) != 2
        or isinstance(doc[0], bool)
        or not isinstance(doc[0], int | float)
        or not math.isfinite(doc[0])
        or not isinstance(doc[1], str)
        or not is_id(doc[1], "vid")
    ):
        raise bad
    return float(doc[0]), doc[1]


def page_query(query: Mapping[str, str]) -> tuple[int, Position | None]:
    """(limit, start after) from the query string."""
    raw = query.get("limit")
    limit = DEFAULT_LIMIT
    if raw is not None:
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise ApiError(
                BAD_REQUEST,
                f"limit: an integer from 1 to {MAX_LIMIT}",
                extra={"field": "limit"},
            )
        limit = int(raw)
    cursor = query.get("cursor")
    return limit, (decode_cursor(cursor) if cursor is not None else None)


async def owner_page(
    conn: AsyncConnection, owner_key_id: str, limit: int, after: Position | None
) -> tuple[Sequence[RowMapping], str | None]:
    """One page of the owner's videos, and the cursor of the next page (None: the last)."""
    cond = and_(videos.c.owner_key_id == owner_key_id, videos.c.state != State.DELETED.value)
    if after is not None:
        at, vid = after
        cond = and_(
            cond,
            or_(
                videos.c.created_at < at,
                and_(videos.c.created_at == at, videos.c.id < vid),
            ),
        )
    rows = (
        (
            await conn.execute(
                select(videos)
                .where(cond)
                .order_by(videos.c.created_at.desc(), videos.c.id.desc())
                .limit(limit + 1)
            )
        )
        .mappings()
        .all()
    )
    page = rows[:limit]
    more = len(rows) > limit
    nxt = encode_cursor((float(page[-1]["created_at"]), str(page[-1]["id"]))) if more else None
    return page, nxt
