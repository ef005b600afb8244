"""Hit ratio of the cache policy on a Zipf trace with a scan burst, against exact LRU and Belady.

    .venv/bin/python bench/hitratio.py [--requests N] [--objects N] [--quick]

Trace (bench/traces.py): Zipf(alpha=0.9) over 100k objects, 1M requests; sizes video-like (90%
segments of 0.5-1.5 MB, 10% manifests of 1-20 KB; popularity and size independent) and, as a
second table, unit size. 15% of the way in, a scan: never-seen objects requested once each,
totalling 1.5x the cache (per cache size). Caches of 1%, 5% and 10% of the catalogue's bytes.

Policies, all with the same byte budget and the same protocol (a request is looked up, a miss is
inserted after the fill):
- LRU: `vodcore.cache.admission.LRU`, exact.
- W-TinyLFU: `vodcore.cache.admission.WTinyLFU`, the code the storages run, default settings.
- Belady: offline, on a miss evict the residents whose next request is farthest (an object never
  requested again is not stored at all). With unit sizes this is optimal (MIN); with variable
  sizes exact optimality is NP-hard and farthest-next-use is the classic heuristic bound
  (Berger et al., SIGMETRICS 2018), not a proof that nothing can do better.

Columns: object hit ratio and byte hit ratio over the whole trace (the scan's misses included,
identically for every policy), "post-scan" = object hit ratio of the 2,000 requests right after
the scan, "hot post-scan" = the same restricted to the hot set (the most popular objects filling
half the cache).
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.traces import Trace, zipf_trace
from vodcore.cache.admission import LRU, EvictionPolicy, WTinyLFU

POST_SCAN = 2_000


@dataclass
class Result:
    hits: int = 0
    bytes_hit: int = 0
    requests: int = 0
    bytes_requested: int = 0
    post_hits: int = 0
    post_requests: int = 0
    hot_hits: int = 0
    hot_requests: int = 0

    def record(self, i: int, oid: int, size: int, hit: bool, trace: Trace) -> None:
        self.requests += 1
        self.bytes_requested += size
        if hit:
            self.hits += 1
            self.bytes_hit += size
        if trace.scan_end <= i < trace.scan_end + POST_SCAN:
            self.post_requests += 1
            self.post_hits += hit
            if oid in trace.hot:
                self.hot_requests += 1
                self.hot_hits += hit

    def row(self) -> tuple[float, float, float, float]:
        return (
            self.hits / self.requests,
            self.bytes_hit / self.bytes_requested,
            self.post_hits / max(1, self.post_requests),
            self.hot_hits / max(1, self.hot_requests),
        )


def simulate(policy: EvictionPolicy, trace: Trace) -> Result:
    res = Result()
    sizes = trace.sizes
    for i, oid in enumerate(trace.requests):
        key = str(oid)
        hit = policy.access(key)
        if not hit:
            policy.insert(key, sizes[oid])
        res.record(i, oid, sizes[oid], hit, trace)
        assert policy.bytes_used <= policy.budget_bytes
    return res


def belady(budget: int, trace: Trace) -> Result:
    reqs, sizes = trace.requests, trace.sizes
    never = len(reqs)
    next_use = [never] * len(reqs)
    last: dict[int, int] = {}
    for i in range(len(reqs) - 1, -1, -1):
        next_use[i] = last.get(reqs[i], never)
        last[reqs[i]] = i
    resident: dict[int, int] = {}  # id -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, id), stale entries skipped lazily
    used = 0
    res = Result()
    for i, oid in enumerate(reqs):
        size, nxt = sizes[oid], next_use[i]
        hit = oid in resident
        res.record(i, oid, size, hit, trace)
        if hit:
            if nxt == never:  # never wanted again: free its room now
                del resident[oid]
                used -= size
            else:
                resident[oid] = nxt
                heapq.heappush(heap, (-nxt, oid))
            continue
        if nxt == never or size > budget:
            continue  # bypass: storing it can only cost
        resident[oid] = nxt
        used += size
        heapq.heappush(heap, (-nxt, oid))
        while used > budget:
            neg, victim = heapq.heappop(heap)
            if resident.get(victim) != -neg:
                continue
            del resident[victim]
            used -= sizes[victim]
    return res


def run(unit: bool, objects: int, requests: int, shares: list[float]) -> list[str]:
    lines = []
    kind = "unit size" if unit else "video-like sizes (mean ~0.9 MB)"
    lines.append(f"\n### Zipf 0.9, {objects:,} objects, {requests:,} requests, {kind}\n")
    lines.append(
        "| cache | policy | object HR | byte HR | post-scan HR | hot-set HR post-scan | time |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for share in shares:
        base = zipf_trace(objects=objects, requests=1, alpha=0.9, scan_at=0, scan_bytes=0,
                          hot_bytes=0, unit=unit)  # fmt: skip
        budget = max(1, int(base.catalogue_bytes * share))
        trace = zipf_trace(
            objects=objects,
            requests=requests,
            alpha=0.9,
            scan_at=0.15,
            scan_bytes=int(1.5 * budget),
            hot_bytes=budget // 2,
            unit=unit,
        )
        runs: list[tuple[str, Callable[[int, Trace], Result]]] = [
            ("LRU", lambda b, t: simulate(LRU(b), t)),
            ("W-TinyLFU", lambda b, t: simulate(WTinyLFU(b), t)),
            ("Belady", belady),
        ]
        for name, fn in runs:
            t0 = time.perf_counter()
            r = fn(budget, trace)
            dt = time.perf_counter() - t0
            hr, bhr, post, hot = r.row()
            line = (
                f"| {share:.0%} | {name} | {hr:.3f} | {bhr:.3f} | {post:.3f} | {hot:.3f} "
                f"| {dt:.1f} s |"
            )
            lines.append(line)
            print(line, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="10x smaller trace")
    ap.add_argument("--unit-only", action="store_true")
    ap.add_argument("--sized-only", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.objects //= 10
        args.requests //= 10
    shares = [0.01, 0.05, 0.10]
    t0 = time.perf_counter()
    out: list[str] = []
    if not args.unit_only:
        out += run(False, args.objects, args.requests, shares)
    if not args.sized_only:
        out += run(True, args.objects, args.requests, shares)
    print("\n".join(out))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
