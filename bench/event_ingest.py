"""Playback-event ingest (issue 6: "goal ≥ 20,000 playback events/s accepted (batched), counters
converging within 2 s").

    .venv/bin/python bench/event_ingest.py [--seconds 10] [--batch 500] [--conns 8] [--rate 0]
        [--procs 1] [--backends sqlite,pg,sqlite-redis,pg-redis] [--converge-timeout 120]

For each backend: a fresh `vod control` (rate limits off) with one READY public video, then an
asyncio client (aiohttp, `--conns` connections, in this process) POSTs `{events: [...]}` batches
to /v1/playback-events for `--seconds`, as fast as the answers come (closed loop: the capacity),
or paced at `--rate` events/s (convergence at a given load). A batch holds `batch / per-session`
playback sessions of `--per-session` events each (start at 0 s, then heartbeats up to 12 s of
position and of wall time), so every session passes the 10 s view rule exactly once: the
expected viewCount is known. Bodies are built from one template (the session ids differ per
request), so the client spends little CPU; it shares the 2 cores with the server anyway.

Sessions (issue 11): control counts only events whose `sessionId` the playback API issued for
the video (`control.playback_sessions`: signed, checked per request), at most
`MAX_SESSIONS_PER_IP` new sessions per client IP and window. The bench mints its session ids
with the control's own secret (`{data}/keys/playback-sessions.key`, the code control uses),
which costs the client ~2 µs a session instead of a playback call, and spreads its requests
over loopback source addresses (127.1.x.y, `--sessions-per-ip` sessions each, a fresh
connection per address), as that many players behind their own addresses would. Events
answered as `rejected` are reported; expected views count only accepted sessions.

Reported: events/s accepted (the sum of `accepted` in the 202 answers over the time from the
first request to the last answer), request latency, then the convergence: how long after the
last 202 until GET /v1/videos/{id} shows the expected viewCount (polled every 50 ms, bounded
by `--converge-timeout`), and the aggregator's drain rate (events/s) over the whole run.
Backends: `sqlite`/`pg`: the embedded path (one row of playback_batches per request; the
aggregator follows the table, a row after a hole in ids waiting settle_seconds=2 s on
PostgreSQL); `*-redis`: one XADD per request to the Redis stream (db 12, or VODBENCH_REDIS),
aggregator = consumer group. The aggregator runs in a thread of its own in each control process
and prunes what it applied every 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import harness as h
import orjson
import playback_auth as pa

from control.playback_sessions import MAX_SESSIONS_PER_IP, SessionSigner

GOAL_EPS = 20_000.0
GOAL_CONVERGE_S = 2.0
PLACEHOLDER = b"QQQQQQQQQQ"
SID_MARK = b"SSSSSSSSSS"  # where each event's session id goes
T0 = 1_714_564_800.0


@dataclass
class Template:
    """A request body cut at its session ids: `parts[i]`, the id of event i's session,
    `parts[i + 1]`…; PLACEHOLDER (in every event id) makes a request's event ids unique."""

    parts: list[bytes]
    per_session: int

    def body(self, counter: int, sids: list[bytes]) -> bytes:
        out = [self.parts[0]]
        for i, part in enumerate(self.parts[1:]):
            out.append(sids[i // self.per_session])
            out.append(part)
        return b"".join(out).replace(PLACEHOLDER, b"%010d" % counter)


def template(batch: int, per_session: int, video: str) -> Template:
    events: list[dict[str, Any]] = []
    sessions = batch // per_session
    step = 12.0 / (per_session - 1)
    for s in range(sessions):
        for k in range(per_session):
            t = k * step
            events.append({
                "eventId": f"{PLACEHOLDER.decode()}-{s}-{k}", "videoId": video,
                "sessionId": SID_MARK.decode(),
                "eventType": "start" if k == 0 else "heartbeat",
                "positionSeconds": t, "occurredAt": T0 + t,
            })  # fmt: skip
    return Template(orjson.dumps({"events": events}).split(SID_MARK), per_session)


@dataclass
class Load:
    accepted: int = 0
    rejected: int = 0
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0


def source_address(n: int) -> str:
    """The n-th loopback source address: 127.1.0.0 and up (all of 127/8 is loopback)."""
    return f"127.{1 + (n >> 16) % 254}.{(n >> 8) & 255}.{n & 255}"


class Sources:
    """One client session per loopback source address; request n goes out from address
    n // per_address, so an address opens at most the per-IP cap of sessions."""

    def __init__(self, per_address: int) -> None:
        self.per_address = max(1, per_address)
        self._http: dict[int, aiohttp.ClientSession] = {}

    def http(self, request_no: int) -> aiohttp.ClientSession:
        n = request_no // self.per_address
        http = self._http.get(n)
        if http is None:
            conn = aiohttp.TCPConnector(limit=0, local_addr=(source_address(n), 0))
            http = self._http[n] = aiohttp.ClientSession(connector=conn)
            for old in [k for k in self._http if k < n - 64]:  # done with: close
                asyncio.get_running_loop().create_task(self._http.pop(old).close())
        return http

    async def close(self) -> None:
        await asyncio.gather(*(h.close() for h in self._http.values()))


async def post_load(
    url: str,
    body: Template,
    signer: SessionSigner,
    video: str,
    seconds: float,
    conns: int,
    start_no: int,
    rate: float = 0.0,
    batch: int = 1,
    sessions_per_ip: int = MAX_SESSIONS_PER_IP,
) -> Load:
    """POST for `seconds` on `conns` concurrent requests: as fast as answers come (closed
    loop), or, with `rate` > 0, request n sent at first + n * batch / rate (paced at `rate`
    events/s)."""
    load = Load()
    counter = [start_no]
    issued = [0]
    headers = {"Content-Type": "application/json"}
    sessions = batch // body.per_session
    sources = Sources(sessions_per_ip // max(1, sessions))
    try:
        load.first = time.monotonic()
        deadline = load.first + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                if rate > 0:
                    due = load.first + issued[0] * batch / rate
                    issued[0] += 1
                    if due >= deadline:
                        return
                    if (delay := due - time.monotonic()) > 0:
                        await asyncio.sleep(delay)
                counter[0] += 1
                now_s = int(time.time())
                sids = [signer.mint(video, now_s).encode() for _ in range(sessions)]
                data = body.body(counter[0], sids)
                t = time.monotonic()
                http = sources.http(counter[0])
                async with http.post(url, data=data, headers=headers) as resp:
                    doc = await resp.read()
                    now = time.monotonic()
                    if resp.status == 202:
                        answer = orjson.loads(doc)
                        load.accepted += answer["accepted"]
                        load.rejected += answer.get("rejected", 0)
                        load.requests += 1
                        load.latencies.append((now - t) * 1000)
                    else:
                        load.errors += 1
                        if load.errors <= 3:
                            print(f"POST {resp.status}: {doc[:200]!r}", file=sys.stderr)
                    load.last = max(load.last, now)

        await asyncio.gather(*(worker() for _ in range(conns)))
    finally:
        await sources.close()
    return load


def view_count(ctl: pa.ControlUnderTest) -> int:
    status, _hd, body = h.get(f"{ctl.url}/v1/videos/{pa.VIDEO}")
    if status != 200:
        raise h.BenchError(f"GET video: {status} {body[:200]!r}")
    return int(orjson.loads(body)["viewCount"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--per-session", type=int, default=5)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="events/s to send (paced); 0: as fast as the server answers")  # fmt: skip
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--backends", default="sqlite,pg,sqlite-redis,pg-redis")
    ap.add_argument("--converge-timeout", type=float, default=120)
    ap.add_argument("--access-log", choices=("on", "off"), default="on")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--sessions-per-ip", type=int, default=MAX_SESSIONS_PER_IP,
                    help="new sessions from one source address (control's per-IP cap)")  # fmt: skip
    a = ap.parse_args()
    if a.batch % a.per_session or a.per_session < 2:
        ap.error("--batch must be a multiple of --per-session (≥ 2)")
    sessions_per_batch = a.batch // a.per_session
    command = "bench/event_ingest.py " + " ".join(sys.argv[1:])
    started = time.time()
    rows = []
    body = template(a.batch, a.per_session, pa.VIDEO)
    with h.fleet_or_exit(keep=a.keep) as fleet:
        for name in a.backends.split(","):
            b = pa.BACKENDS[name]
            ctl = pa.start_controls(
                fleet, f"{name}-x{a.procs}", b, procs=a.procs,
                access_log=a.access_log == "on", prepare=pa.insert_ready_video,
            )  # fmt: skip
            url = f"{ctl.url}/v1/playback-events"
            signer = SessionSigner.load_or_create(ctl.data / "keys")  # control made it
            run = {"signer": signer, "video": pa.VIDEO, "sessions_per_ip": a.sessions_per_ip}
            warm = asyncio.run(  # connections, JIT-free warm-up
                post_load(url, body, seconds=0.5, conns=2, start_no=0, batch=a.batch, **run)
            )
            load = asyncio.run(
                post_load(url, body, seconds=a.seconds, conns=a.conns, start_no=10**8,
                          rate=a.rate, batch=a.batch, **run)
            )  # fmt: skip
            # every accepted session passes the view rule once (a session is all or nothing)
            expected = (warm.accepted + load.accepted) // a.per_session
            end_of_posts = time.monotonic()
            at_end = view_count(ctl)
            converged: float | None = None
            seen = at_end
            while time.monotonic() - end_of_posts < a.converge_timeout:
                seen = view_count(ctl)
                if seen >= expected:
                    converged = time.monotonic() - load.last
                    break
                time.sleep(0.05)
            drain_until = load.last + (converged if converged is not None else a.converge_timeout)
            total_events = (warm.requests + load.requests) * a.batch
            drain_eps = total_events / (drain_until - warm.first)
            if seen > expected:
                raise h.BenchError(f"{name}: viewCount {seen} > expected {expected}")
            eps = load.accepted / (load.last - load.first)
            conv = f"{converged:.2f}" if converged is not None else f"> {a.converge_timeout:g}"
            print(f"{name:12} {eps:10,.0f} events/s accepted, {load.rejected} rejected, "
                  f"{load.errors} errors, "
                  f"views {at_end}/{expected} at the last 202, converged after {conv} s",
                  flush=True)  # fmt: skip
            met_eps = eps >= GOAL_EPS and load.errors == 0
            met_conv = converged is not None and converged <= GOAL_CONVERGE_S
            rows.append([
                name, a.procs, f"{load.requests:,}", f"{eps:,.0f}", h.ratio(eps, GOAL_EPS),
                f"{h.percentile(load.latencies, 50):.1f}",
                f"{h.percentile(load.latencies, 99):.1f}", load.errors,
                f"{at_end:,} / {expected:,}", conv, f"{drain_eps:,.0f}",
                "met" if met_eps else "NOT met", "met" if met_conv else "NOT met",
            ])  # fmt: skip
            for p in ctl.procs:
                fleet.stop(p)
            if b.redis:
                pa.flush_redis()
    h.banner(
        f"Playback-event ingest: POST /v1/playback-events, {a.batch} events per request "
        f"({sessions_per_batch} sessions x {a.per_session} events), {a.conns} connections, "
        f"{f'paced at {a.rate:,.0f} events/s' if a.rate else 'closed loop'}, "
        f"{a.seconds:g} s, {a.procs} control process(es), access log {a.access_log}, rate "
        f"limits off ({h.machine()}, {time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    print(f"command: `.venv/bin/python {command.strip()}`\n")
    print(h.table(
        ["backend", "procs", "requests", "events/s accepted", "/ goal", "p50 ms", "p99 ms",
         "errors", "views at last 202 / expected", "converged after s",
         "aggregator events/s (whole run)", f"goal ≥{GOAL_EPS:,.0f}/s",
         f"goal ≤{GOAL_CONVERGE_S:g} s"],
        rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
