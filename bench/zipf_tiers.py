"""Three tiers of our stack on a Zipf workload: edge → shield → origin.

    .venv/bin/python bench/zipf_tiers.py [--objects 2000] [--seg-kib 32] [--requests 100000]
        [--alpha 1.0] [--edge-pct 10] [--shield-pct 50] [--concurrency 16]

The origin (bench/upstream.py) serves `/v/vid/1/seg-{n}.m4s` (--seg-kib each); the shield is
`vod shield --upstream ORIGIN`, the edge `vod edge --tokens off --upstream SHIELD`, with cache
budgets from a TOML --config: edge = --edge-pct of the working set's bytes, shield =
--shield-pct. Requests follow Zipf(alpha) over the objects (ranks shuffled onto segment numbers,
fixed seed) and are classified by X-Cache: `edge=HIT`, `edge=MISS, shield=HIT`,
`edge=MISS, shield=MISS` (origin). The first --warmup share of the trace fills the caches and
is reported separately.

Printed beside the measurement, for the same trace and sizes: the static optimum (the cache
holds the most popular objects that fit: the best any policy can do on an independent
reference stream, up to compulsory misses) and an exact-LRU simulation, so the engine's numbers
can be read against its policy and against the limit. Seeds' targets (issue 3): ≥95% edge,
≥80% shield on edge misses, ~1% of requests at the origin.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter, OrderedDict
from itertools import accumulate

import aiohttp
import harness as h
import uvloop

ENTRY_OVERHEAD = 400  # approximate bytes a cache entry charges beyond its body (headers, key)


def zipf_trace(n: int, requests: int, alpha: float, seed: int) -> tuple[list[int], list[float]]:
    """Object numbers of a Zipf(alpha) trace, and each object's probability."""
    rng = random.Random(seed)
    weights = [1 / (k**alpha) for k in range(1, n + 1)]
    total = sum(weights)
    order = list(range(n))
    rng.shuffle(order)  # popularity rank k → object order[k]
    ranks = rng.choices(range(n), cum_weights=list(accumulate(weights)), k=requests)
    prob = [0.0] * n
    for k, w in enumerate(weights):
        prob[order[k]] = w / total
    return [order[k] for k in ranks], prob


def lru_sim(trace: list[int], capacity: int) -> list[bool]:
    """Hit (True) or miss per request of an exact LRU holding `capacity` objects."""
    cache: OrderedDict[int, None] = OrderedDict()
    out = []
    for x in trace:
        if x in cache:
            cache.move_to_end(x)
            out.append(True)
        else:
            out.append(False)
            cache[x] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return out


async def drive(base: str, trace: list[int], concurrency: int) -> list[str]:
    """X-Cache of every request, in trace order ('ERR' on failure)."""
    out = [""] * len(trace)
    it = iter(range(len(trace)))
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:

        async def worker() -> None:
            for i in it:
                try:
                    async with s.get(f"{base}/v/vid/1/seg-{trace[i]}.m4s") as r:
                        await r.read()
                        xc = r.headers.get("X-Cache", "")
                        out[i] = xc if r.status == 200 else f"ERR {r.status} {xc}"
                except (aiohttp.ClientError, TimeoutError) as e:
                    out[i] = f"ERR {type(e).__name__}"

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def classify(xc: str) -> str:
    x = xc.replace(" ", "").lower()
    if x.startswith("edge=hit"):
        return "edge"
    if "shield=hit" in x:
        return "shield"
    if "shield=miss" in x:
        return "origin"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--seg-kib", type=int, default=32)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--edge-pct", type=float, default=10)
    ap.add_argument("--shield-pct", type=float, default=50)
    ap.add_argument("--warmup", type=float, default=0.2, help="share of the trace not scored")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    seg = a.seg_kib * 1024
    working_set = a.objects * seg
    edge_bytes = int(working_set * a.edge_pct / 100)
    shield_bytes = int(working_set * a.shield_pct / 100)
    trace, prob = zipf_trace(a.objects, a.requests, a.alpha, a.seed)
    warm_n = int(len(trace) * a.warmup)

    with h.fleet_or_exit(keep=a.keep) as fleet:
        up = h.start_upstream(fleet, seg_bytes=seg)
        cfg = h.write_config(fleet, "tiers", edge_bytes=edge_bytes, shield_bytes=shield_bytes)
        shield = h.start_vod(fleet, "shield", up.url, name="shield", config=cfg)
        edge = h.start_vod(fleet, "edge", shield.url, name="edge", config=cfg)
        status, headers, body = h.get(f"{edge.url}/v/vid/1/seg-0.m4s")
        if status != 200 or len(body) != seg:
            raise h.BenchError(f"probe: {status} {headers.get('X-Cache')} {body[:200]!r}")
        h.get_json(up.url + "/_reset")

        started = time.time()
        t0 = time.perf_counter()
        xcache = uvloop.run(drive(edge.url, trace, a.concurrency))
        elapsed = time.perf_counter() - t0
        origin_total = h.get_json(up.url + "/_count")["total"]

    kinds = [classify(x) for x in xcache]
    unknown = Counter(x for x, k in zip(xcache, kinds, strict=True) if k == "other").most_common(4)

    def shares(ks: list[str]) -> tuple[float, float, float, int]:
        n = len(ks)
        e, s_, o = ks.count("edge"), ks.count("shield"), ks.count("origin")
        misses = n - e
        return e / n, (s_ / misses if misses else 0.0), o / n, n - e - s_ - o

    # References on the same trace: exact LRU at each tier, and the static optimum.
    k_edge = edge_bytes // (seg + ENTRY_OVERHEAD)
    k_shield = shield_bytes // (seg + ENTRY_OVERHEAD)
    edge_lru = lru_sim(trace, k_edge)
    miss_stream = [x for x, hit in zip(trace, edge_lru, strict=True) if not hit]
    shield_lru = lru_sim(miss_stream, k_shield)
    lru_kinds: list[str] = []
    it = iter(shield_lru)
    for hit in edge_lru:
        lru_kinds.append("edge" if hit else ("shield" if next(it) else "origin"))
    top = sorted(prob, reverse=True)
    p_edge, p_shield = sum(top[:k_edge]), sum(top[:k_shield])
    opt_shield = (p_shield - p_edge) / (1 - p_edge) if p_edge < 1 else 0.0

    h.banner(
        f"Zipf tiers: alpha={a.alpha}, {a.objects} objects x {a.seg_kib} KiB "
        f"(working set {working_set / h.MiB:.0f} MiB), edge cache {a.edge_pct:g}% "
        f"({edge_bytes / h.MiB:.1f} MiB ≈ {k_edge} objects), shield {a.shield_pct:g}% "
        f"({shield_bytes / h.MiB:.1f} MiB ≈ {k_shield} objects), {a.requests} requests, "
        f"concurrency {a.concurrency} ({h.machine()}, "
        f"{time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    rows = []
    for label, ks in (
        ("ours, whole trace", kinds),
        (f"ours, after {a.warmup:.0%} warm-up", kinds[warm_n:]),
        ("exact LRU sim, whole trace", lru_kinds),
        ("exact LRU sim, after warm-up", lru_kinds[warm_n:]),
    ):
        e, s_, o, bad = shares(ks)
        rows.append([label, f"{e:.1%}", f"{s_:.1%}", f"{o:.2%}", str(bad)])
    rows.append(
        [
            "static optimum (IRM limit)",
            f"{p_edge:.1%}",
            f"{opt_shield:.1%}",
            f"{(1 - p_shield):.2%}",
            "-",
        ]
    )
    rows.append(["seeds' targets", "≥95%", "≥80%", "~1%", "-"])
    print(
        h.table(
            [
                "",
                "edge hit ratio",
                "shield hit ratio on edge misses",
                "requests reaching origin",
                "errors/unclassified",
            ],
            rows,
        )
    )
    print(
        f"\n{a.requests} requests in {elapsed:.1f} s ({a.requests / elapsed:,.0f} req/s through "
        f"the edge); origin counted {origin_total} fetches, X-Cache said "
        f"{kinds.count('origin')}."
    )
    if unknown:
        print(f"errors/unclassified answers, most common: {unknown}")


if __name__ == "__main__":
    main()
