"""Purge API and the purge stream caching nodes follow (issue 4).

- `POST /v1/purges` (operator) appends a purge to the log (table `purges`, ordered by `seq`)
  in one transaction with its event, and wakes every open stream at once → 202
  `{purgeId, seq}`.
- `GET /v1/purges/stream?after=SEQ&node=ID&tier=T` (T: edge, shield or origin) is a
  server-sent-event stream of every purge with seq > SEQ, in order, then of new ones as they
  are appended; `id:` is the seq, so a node that reconnects resumes from the last one it applied
  and misses nothing (the log is durable). Once per connection, when the backlog has been sent,
  an `event: live` (data: the last seq sent) says the node is caught up. Comments (`: ping`)
  keep idle connections alive and refresh the node's last-seen time.
- `POST /v1/purges/acks {node, tier, seqs}`: a node says which purges it applied (the highest
  seq also stands for every lower one: the node's applied seq is the maximum). At most
  `MAX_ACK_SEQS` seqs per request, none above the log's last seq (422: a node cannot claim a
  purge that does not exist yet, so a forged "applied up to 2^62" is refused).
- `GET /v1/purges/{id}`: which active nodes (seen in the last `ACTIVE_SECONDS`, registered
  with a node credential) applied it and when, and `complete` once all of them have.

Nodes (issue 11): the stream and the acks require a node credential (`control.nodeauth`; the
middleware puts it in the request). A node id is bound to the credential that first registered
it: another credential cannot stream or ack as that node (403). The `nodes` table is bounded:
nodes unseen for `node_ttl_seconds` are dropped whenever a node registers, and a credential
holds at most `max_nodes_per_credential` node ids: registering one more drops that
credential's longest-unseen node (not refused: node ids carry the process id, so every restart
is a new id, and refusing would lock a restarted fleet out; dropping the oldest lets a leaked
credential churn only its own nodes, never another credential's).
Wake-ups are in-process (one control process); every stream also re-reads the log every
`POLL_SECONDS`, so a purge written by another control process still arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control.auth import authenticate
from control.ids import new_id
from control.nodeauth import NODE_KEY, NODE_LIMITS_KEY, NodeLimits, check_tier, still_valid
from control.nodes_credentials import NodeCredential
from control.validation import decode_json
from vodcore.db.schema import nodes, purge_acks, purges, videos
from vodcore.db.videos import append_event
from vodcore.errors import FORBIDDEN, NOT_FOUND, UNAUTHENTICATED, VALIDATION, ApiError
from vodcore.purge import Purge, parse_request

ACTIVE_SECONDS = 60.0
POLL_SECONDS = 1.0
PING_SECONDS = 10.0
BATCH = 500
TAIL = 10_000  # recent purges kept in memory for the streams
TIERS = ("edge", "shield", "origin")  # the nodes that follow the log
MAX_ACK_SEQS = 1000  # per request (a node's feed sends at most ACK_BATCH)


def _node_credential(request: web.Request) -> NodeCredential:
    cred: NodeCredential | None = request.get(NODE_KEY)
    if cred is None:  # the node endpoints are always behind control.nodeauth
        raise ApiError(UNAUTHENTICATED, "a node credential is required")
    return cred


def _row_to_purge(row: Any) -> Purge:
    return Purge(
        row.seq, row.id, row.kind, tuple(row.targets), bool(row.soft), row.action, row.cutoff
    )


class Purges:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._new = asyncio.Event()
        self._closing = False
        # The recent tail of the log, in seq order, so open streams need no database read per
        # purge; a stream further behind reads the database.
        self._tail: deque[Purge] = deque(maxlen=TAIL)
        # One writer at a time: SQLite admits one write transaction, and a second one waits in
        # its busy handler, which sleeps in steps of up to 100 ms. Queuing the log's writes here
        # instead keeps each one at its own cost (PostgreSQL does not need it, nor mind it).
        self._write = asyncio.Lock()

    async def _on_shutdown(self, _app: web.Application) -> None:
        # Streams never end on their own: end them now so a graceful stop does not wait.
        self._closing = True
        self._wake()

    def routes(self, app: web.Application) -> None:
        app.on_shutdown.append(self._on_shutdown)
        app.router.add_post("/v1/purges", self.create)
        app.router.add_get("/v1/purges/stream", self.stream)
        app.router.add_post("/v1/purges/acks", self.acks)
        app.router.add_get("/v1/purges/{id}", self.status)

    def _wake(self) -> None:
        self._new.set()
        self._new = asyncio.Event()

    async def create(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.engine, request, roles=("operator",))
        kind, targets, soft = parse_request(decode_json(await request.read()))
        now = time.time()
        async with self._write, self.engine.begin() as conn:
            if kind == "video":
                found = (
                    await conn.execute(select(videos.c.id).where(videos.c.id.in_(targets)))
                ).scalars()
                missing = set(targets) - set(found)
                if missing:
                    raise ApiError(NOT_FOUND, f"no such video: {', '.join(sorted(missing))}")
            p = await self.append(conn, kind, targets, soft, principal.key_id, now)
        self.published(p)
        return web.json_response({"purgeId": p.id, "seq": p.seq}, status=202)

    async def append(
        self,
        conn: AsyncConnection,
        kind: str,
        targets: tuple[str, ...],
        soft: bool,
        actor: str | None,
        now: float,
        *,
        action: str = "purge",
        cutoff: float | None = None,
    ) -> Purge:
        """Append a purge to the log inside the caller's transaction (hold `self._write` on
        SQLite); call `published` after the commit."""
        pid = new_id("pg")
        res = await conn.execute(
            purges.insert().values(
                id=pid, kind=kind, targets=list(targets), soft=int(soft),
                created_by=actor, created_at=now, action=action, cutoff=cutoff,
            )
        )  # fmt: skip
        pk = res.inserted_primary_key
        assert pk is not None
        seq = int(pk[0])
        await append_event(
            conn, "purge.created", targets[0] if kind == "video" else None,
            {"purgeId": pid, "seq": seq, "kind": kind, "targets": list(targets),
             "soft": soft, "by": actor, "action": action}, now,
        )  # fmt: skip
        return Purge(seq, pid, kind, targets, soft, action, cutoff)

    def published(self, p: Purge) -> None:
        """After the commit: into the streams' tail, and wake them."""
        if not self._tail or self._tail[-1].seq < p.seq:
            self._tail.append(p)
        self._wake()

    async def status(self, request: web.Request) -> web.Response:
        # operators only: the answer names every node (tier, host, port, pid) of the fleet
        await authenticate(self.engine, request, roles=("operator",))
        pid = request.match_info["id"]
        now = time.time()
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(purges).where(purges.c.id == pid))).first()
            if row is None:
                raise ApiError(NOT_FOUND, "no such purge")
            active = (
                await conn.execute(
                    select(nodes).where(
                        nodes.c.last_seen >= now - ACTIVE_SECONDS,
                        nodes.c.credential_id.is_not(None),  # authenticated nodes only
                    )
                )
            ).all()
            acked = {
                r.node_id: r.applied_at
                for r in (
                    await conn.execute(select(purge_acks).where(purge_acks.c.seq == row.seq))
                ).all()
            }
        report = [
            {
                "node": n.id,
                "tier": n.tier,
                "applied": n.applied_seq >= row.seq,
                "appliedAt": acked.get(n.id),
            }
            for n in active
        ]
        return web.json_response(
            {
                **_row_to_purge(row).to_json(),
                "createdAt": row.created_at,
                "nodes": report,
                "complete": bool(report) and all(r["applied"] for r in report),
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _after(self, after: int) -> list[Purge]:
        """Purges with seq > `after`, in order (at most BATCH): from the in-memory tail when it
        covers them, else from the log. A new process starts with an empty tail, and seqs
        below its first entry may exist only in the database, so the tail answers alone only
        when its first entry is at or below after + 1."""
        tail = self._tail
        if tail and tail[0].seq <= after + 1:
            return [p for p in tail if p.seq > after][:BATCH]
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(purges).where(purges.c.seq > after).order_by(purges.c.seq).limit(BATCH)
                )
            ).all()
        return [_row_to_purge(r) for r in rows]

    async def _register(
        self,
        conn: AsyncConnection,
        node: str,
        tier: str,
        cred: NodeCredential,
        limits: NodeLimits,
        now: float,
        values: dict[str, Any],
        applied: int = 0,
    ) -> None:
        """Mark `node` seen (with `values`), or insert it with `applied` as its applied seq,
        registering it for `cred` if new; 403 if another
        credential registered it. Registration sweeps expired nodes and keeps the credential
        within its cap (module rules)."""
        row = (await conn.execute(select(nodes.c.credential_id).where(nodes.c.id == node))).first()
        if row is not None:
            if row.credential_id is not None and row.credential_id != cred.id:
                raise ApiError(FORBIDDEN, "this node id belongs to another node credential")
            await conn.execute(
                update(nodes)
                .where(nodes.c.id == node)
                .values(last_seen=now, tier=tier, credential_id=cred.id, **values)
            )
            return
        expired = select(nodes.c.id).where(nodes.c.last_seen < now - limits.ttl_seconds)
        await conn.execute(delete(purge_acks).where(purge_acks.c.node_id.in_(expired)))
        await conn.execute(delete(nodes).where(nodes.c.last_seen < now - limits.ttl_seconds))
        mine = (
            (
                await conn.execute(
                    select(nodes.c.id)
                    .where(nodes.c.credential_id == cred.id)
                    .order_by(nodes.c.last_seen.desc())
                )
            )
            .scalars()
            .all()
        )
        drop = list(mine[limits.max_per_credential - 1 :])
        if drop:
            await conn.execute(delete(purge_acks).where(purge_acks.c.node_id.in_(drop)))
            await conn.execute(delete(nodes).where(nodes.c.id.in_(drop)))
        await conn.execute(
            nodes.insert().values(
                id=node, tier=tier, last_seen=now, credential_id=cred.id, applied_seq=applied
            )
        )  # fmt: skip

    async def _seen(
        self, node: str, tier: str, cred: NodeCredential, limits: NodeLimits, now: float
    ) -> None:
        async with self._write, self.engine.begin() as conn:
            await self._register(conn, node, tier, cred, limits, now, {})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        after_s = request.query.get("after", "0")
        node = request.query.get("node", "")
        tier = request.query.get("tier", "")
        digits = after_s.isascii() and after_s.isdigit() and len(after_s) <= 18  # 64-bit int
        if not digits or not node or len(node) > 80 or tier not in TIERS:
            raise ApiError(
                VALIDATION, "after (a number), node and tier (edge|shield|origin) required"
            )
        after = int(after_s)
        cred = _node_credential(request)
        limits = request.app.get(NODE_LIMITS_KEY) or NodeLimits()
        await self._seen(node, tier, cred, limits, time.time())
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        last_ping = time.monotonic()
        live = False
        while not self._closing:
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the node went away
            new = self._new  # taken before reading, so a purge appended meanwhile wakes us
            batch = await self._after(after)
            if batch:
                out = []
                for p in batch:
                    data = orjson.dumps(p.to_json()).decode()
                    out.append(f"id: {p.seq}\nevent: purge\ndata: {data}\n\n")
                    after = p.seq
                await resp.write("".join(out).encode())
                continue
            if not live:  # the backlog is out: the node is caught up
                await resp.write(f"event: live\ndata: {after}\n\n".encode())
                live = True
            if time.monotonic() - last_ping >= PING_SECONDS:
                if not await still_valid(self.engine, cred.id):
                    break  # the credential was revoked: this node is no longer heard
                await resp.write(b": ping\n\n")
                await self._seen(node, tier, cred, limits, time.time())
                last_ping = time.monotonic()
            try:
                await asyncio.wait_for(new.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
        return resp

    async def acks(self, request: web.Request) -> web.Response:
        cred = _node_credential(request)
        limits = request.app.get(NODE_LIMITS_KEY) or NodeLimits()
        doc = decode_json(await request.read())
        if not isinstance(doc, dict):
            raise ApiError(VALIDATION, "the body must be a JSON object")
        node, tier, seqs = doc.get("node"), doc.get("tier"), doc.get("seqs")
        if (
            not isinstance(node, str) or not node or len(node) > 80
            or tier not in TIERS
            or not isinstance(seqs, list) or not seqs or len(seqs) > MAX_ACK_SEQS
            or not all(type(s) is int and 0 < s < 2**62 for s in seqs)
        ):  # fmt: skip
            raise ApiError(
                VALIDATION,
                f"node, tier (edge|shield|origin) and seqs (1 to {MAX_ACK_SEQS} positive ints)",
            )
        assert isinstance(tier, str)
        check_tier(cred, tier)
        top = max(seqs)
        now = time.time()
        async with self._write, self.engine.begin() as conn:
            last = (await conn.execute(select(func.max(purges.c.seq)))).scalar() or 0
            if top > last:
                raise ApiError(VALIDATION, f"seq {top} is beyond the purge log (last seq {last})")
            applied = (
                func.max(nodes.c.applied_seq, top)
                if conn.dialect.name == "sqlite"
                else func.greatest(nodes.c.applied_seq, top)
            )
            await self._register(conn, node, tier, cred, limits, now, {"applied_seq": applied}, top)
            known = set(
                (
                    await conn.execute(select(purge_acks.c.seq).where(
                        and_(purge_acks.c.node_id == node, purge_acks.c.seq.in_(seqs))
                    ))
                ).scalars()
            )  # fmt: skip
            fresh = sorted(set(seqs) - known)
            if fresh:
                await conn.execute(
                    purge_acks.insert(),
                    [{"seq": s, "node_id": node, "applied_at": now} for s in fresh],
                )
        return web.json_response({"node": node, "appliedSeq": top})
