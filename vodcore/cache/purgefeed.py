"""A caching node's side of the purge log: follow control's stream, apply every purge in order,
acknowledge it (issue 4).

Rules:
- the node remembers the last seq it applied (a small state file, written atomically), and
  (re)connects with `after=` that seq, so purges issued while it was down or disconnected are
  replayed before newer ones: none is skipped;
- purges are applied strictly in seq order; a purge already applied (seq ≤ applied) is
  ignored; garbage, or a seq that skips ahead, makes the node drop the connection and
  resynchronise from what it applied. A gap that is still there right after a resync is real
  (the log has no row there, e.g. a rolled-back insert) and is accepted;
- every applied purge is acknowledged to control, which reports completeness (a node may
  acknowledge only the purges that concern it, `ack_filter`: each batch then still carries the
  highest seq applied, so control sees it advance);
- control marks the end of the backlog with a `live` event; from the first one on, `caught_up`
  is True: everything logged before the node connected has been applied;
- reconnects back off from 0.2 s to 5 s;
- every call to control carries the node credential (`Authorization: Bearer vodn_…`, setting
  `node_credential`): control answers the stream and the acks only to authenticated nodes
  (issue 11); a refusal (401/403) is logged and retried like any other failure;
- an ack request carries at most `ACK_BATCH` seqs (control refuses bigger ones);
- a node that has not heard from control (a purge, a `live` or a keep-alive ping) for longer
  than `blind_after` seconds is *blind*: it cannot know what was purged meanwhile, so its
  cache revalidates every stored response with the upstream instead of serving it blindly
  (`CacheEngine.serve`, and the fast path steps aside) until the stream is back (`trusts`).
  Before it has caught up once since it started, it trusts only what it stored since then:
  objects kept on disk from a previous run wait for the replay of the purges they missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import aiohttp
import orjson

from vodcore.purge import Purge

if TYPE_CHECKING:
    from vodcore.cache.engine import CacheEngine
    from vodcore.config import Settings

log = logging.getLogger("vod.purge")
ACK_BATCH = 500  # seqs per ack request (control takes at most 1000)


def node_headers(credential: str | None) -> dict[str, str]:
    """The headers a node sends on control's node endpoints."""
    return {"Authorization": f"Bearer {credential}"} if credential else {}


class Resync(Exception):
    """The stream said something we cannot apply in order: reconnect from `applied`."""


class PurgeFeed:
    def __init__(
        self,
        control_url: str,
        node_id: str,
        tier: str,
        apply: Callable[[Purge], Awaitable[object]],
        state_path: Path | None = None,
        blind_after: float = 30.0,
        *,
        ack_filter: Callable[[Purge], bool] | None = None,
        credential: str | None = None,
    ) -> None:
        self.control = control_url.rstrip("/")
        self.node_id = node_id
        self.tier = tier
        self.headers = node_headers(credential)
        self.apply = apply
        self.state_path = state_path
        self.applied = self._load()
        self.connected = False
        self.blind_after = blind_after
        self.heard: float | None = None  # monotonic time of the last line from the stream
        self.started_at = time.time()  # wall clock, comparable with a stored response's time
        self.caught_up = False  # the whole backlog applied at least once (see `live`)
        self._live = asyncio.Event()
        self.ack_filter = ack_filter
        self._acked = 0  # the highest seq control has acknowledged
        self._accept_gap_at: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._advanced = asyncio.Event()
        self._unacked: list[int] = []
        self._ack_wake = asyncio.Event()
        self._acker: asyncio.Task[None] | None = None
        # Called each time the stream (re)connects, before its events: state that is not in
        # the replayed part of the log (e.g. every video's token cutoff) is reloaded here.
        self.on_connect: Callable[[aiohttp.ClientSession], Awaitable[None]] | None = None

    def _load(self) -> int:
        if self.state_path is None:
            return 0
        try:
            return int(self.state_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _save(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(str(self.applied))
        os.replace(tmp, self.state_path)

    def blind(self, now: float) -> bool:
        """True while this node cannot know what was purged lately (`now`: monotonic)."""
        heard = self.heard
        return heard is None or now - heard > self.blind_after

    def trusts(self, stored_at: float, now: float) -> bool:
        """May a response stored at `stored_at` (wall clock) be served without asking
        upstream? `now` is monotonic. See the module rules."""
        heard = self.heard
        if heard is None:
            return stored_at >= self.started_at
        return now - heard <= self.blind_after

    async def wait_for(self, seq: int, within: float) -> bool:
        """Wait (woken by each applied purge, never polling) until `seq` is applied; False if
        it is not within `within` seconds."""
        try:
            async with asyncio.timeout(within):
                while self.applied < seq:
                    await self._advanced.wait()
        except TimeoutError:
            return False
        return True

    async def wait_caught_up(self, within: float | None = None) -> bool:
        """Wait until the backlog has been applied (the first `live` event); False if not
        within `within` seconds (None: no limit)."""
        try:
            async with asyncio.timeout(within):
                await self._live.wait()
        except TimeoutError:
            return False
        return True

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._task = asyncio.create_task(self._run(session))
        self._acker = asyncio.create_task(self._ack_loop())

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            picked, self._unacked = self._unacked[:ACK_BATCH], self._unacked[ACK_BATCH:]
            if self._unacked:
                self._ack_wake.set()  # more to send after this batch
            top = self.applied  # filtered-out purges are acknowledged by the highest seq
            behind = top > self._acked and (not picked or picked[-1] < top) and not self._unacked
            seqs = [*picked, top] if behind else picked
            if not seqs:
                continue
            await asyncio.to_thread(self._save)
            if await self._ack(seqs):
                self._acked = max(self._acked, seqs[-1])
            else:
                self._unacked[:0] = picked  # control unreachable: keep them for the next try
                await asyncio.sleep(0.5)
                self._ack_wake.set()

    async def close(self) -> None:
        for task in (self._task, self._acker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self, session: aiohttp.ClientSession) -> None:
        backoff = 0.2
        while True:
            try:
                await self._follow(session)
            except (aiohttp.ClientError, TimeoutError, ConnectionError, Resync) as e:
                log.info("%s: purge stream: %s; resuming after seq %d", self.node_id, e,
                         self.applied)  # fmt: skip
            except Exception:
                log.exception("%s: purge stream failed", self.node_id)
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(5.0, backoff * 2)

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        url = (
            f"{self.control}/v1/purges/stream?after={self.applied}"
            f"&node={self.node_id}&tier={self.tier}"
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
        async with session.get(url, timeout=timeout, headers=self.headers) as resp:
            if resp.status != 200:
                raise Resync(f"control answered {resp.status}")
            if self.on_connect is not None:
                await self.on_connect(session)
            self.connected = True
            first = True
            event, data = "", cast(list[str], [])
            live_here = False  # this connection's backlog is not applied yet: still blind
            async for raw in resp.content:
                if live_here:
                    self.heard = time.monotonic()
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line == "":  # end of an event (text/event-stream)
                    if event == "purge":
                        await self._dispatch(data, first)
                        first = False
                    elif event == "live":
                        live_here, self.heard = True, time.monotonic()
                        self.caught_up = True
                        self._live.set()
                    event, data = "", []
                elif line.startswith(":"):
                    continue  # a comment: keep-alive
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)
        raise ConnectionError("the purge stream ended")

    async def _dispatch(self, data: list[str], first: bool) -> None:
        try:
            purge = Purge.from_json(orjson.loads("\n".join(data)))
        except (ValueError, orjson.JSONDecodeError) as e:
            raise Resync(f"garbage on the stream: {e}") from None
        if purge.seq <= self.applied:
            return  # already applied (a replay)
        if purge.seq != self.applied + 1:
            # Skipping ahead: resync once; if the same gap opens the stream again, it is real.
            if not (first and self._accept_gap_at == purge.seq):
                self._accept_gap_at = purge.seq
                raise Resync(f"gap: applied {self.applied}, got {purge.seq}")
        self._accept_gap_at = None
        await self.apply(purge)
        self.applied = purge.seq
        self._advanced.set()
        self._advanced = asyncio.Event()
        # Acknowledged (and the applied seq saved) in batches by `_ack_loop`: one request in
        # flight per node, carrying every purge applied since the last one.
        if self.ack_filter is None or self.ack_filter(purge):
            self._unacked.append(purge.seq)
        self._ack_wake.set()

    async def _ack(self, seqs: list[int]) -> bool:
        assert self._session is not None
        try:
            async with self._session.post(
                f"{self.control}/v1/purges/acks",
                json={"node": self.node_id, "tier": self.tier, "seqs": seqs},
                timeout=aiohttp.ClientTimeout(total=5),
                headers=self.headers,
            ) as r:
                await r.read()
                if r.status in (401, 403):
                    log.warning(
                        "%s: control refused the node credential (%d) for acks", self.node_id,
                        r.status,
                    )  # fmt: skip
                return r.status < 300
        except (aiohttp.ClientError, TimeoutError):
            log.warning("%s: could not acknowledge purges up to %d", self.node_id, seqs[-1])
            return False


def follow_purges(engine: CacheEngine, settings: Settings, tier: str, control_url: str) -> None:
    """Make a tier's engine follow control's purge log; the node id names tier, address and
    process (SO_REUSEPORT siblings are separate caches), the applied seq lives per process."""
    node = f"{tier}@{settings.host}:{settings.port(tier)}/{os.getpid()}"
    state = settings.data_dir / "cache" / f"{tier}-{settings.port(tier)}.purge-seq"
    feed = engine.follow_purges(control_url, node, state)
    feed.headers = node_headers(settings.node_credential)
    feed.blind_after = settings.purge_blind_seconds
