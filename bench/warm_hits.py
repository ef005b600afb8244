"""Warm hits: wrk against a cached 1 MiB object (GB/s) and a cached 1 KiB object (req/s) on our
edge (1 and 2 processes), nginx (proxy_cache, 2 workers) and Varnish, all in the same run.

    .venv/bin/python bench/warm_hits.py [--seconds 10] [--reps 3] [--conns 64]

Repetitions are interleaved (rep 1 of every target, then rep 2, …) so a noisy neighbour hurts
every target alike; the table shows medians and the ratios ours/nginx and ours/varnish.
Goals (issue 3): 1 MB ≥ 1.0x nginx's GB/s; 1 KB ≥ 0.6x nginx's req/s.
"""

from __future__ import annotations

import argparse
import time

import harness as h

GOAL_1M = 1.0
GOAL_1K = 0.6


def warm(t: h.Target, path: str, procs: int) -> None:
    """Fetch until `procs`*5 answers in a row are hits: each request is a new connection, so
    the kernel spreads them over every SO_REUSEPORT process and each one caches the object."""
    in_a_row = 0
    for _ in range(500):
        status, headers, _body = h.get(t.url + path)
        if status != 200:
            raise h.BenchError(f"{t.name} {path}: status {status}")
        in_a_row = in_a_row + 1 if "HIT" in headers.get("X-Cache", "") else 0
        if in_a_row >= 5 * procs:
            return
    raise h.BenchError(f"{t.name} {path}: never became a hit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    a = ap.parse_args()

    with h.fleet_or_exit(keep=a.keep) as fleet:
        up = h.start_upstream(fleet)
        targets = [
            h.start_vod(fleet, "edge", up.url, procs=1, name="ours-1proc"),
            h.start_vod(fleet, "edge", up.url, procs=2, name="ours-2proc"),
            h.start_vod(fleet, "edge", up.url, procs=2, name="ours-2proc-nolog", access_log=False),
            h.start_nginx(fleet, up.port, name="nginx"),
            h.start_varnish(fleet, up.port, name="varnish"),
        ]
        objects = {"1m": "/obj/1m/warm-{}", "1k": "/obj/1k/warm-{}"}
        for t in targets:
            for pattern in objects.values():
                warm(t, pattern.format(t.name), len(t.procs))
                h.wrk(
                    t.url + pattern.format(t.name), threads=a.threads, conns=a.conns, seconds=2
                )  # warm-up: pools, buffers, page cache

        results: dict[tuple[str, str], list[h.WrkResult]] = {}
        started = time.time()
        for rep in range(a.reps):
            for size, pattern in objects.items():
                for t in targets:
                    r = h.wrk(
                        t.url + pattern.format(t.name),
                        threads=a.threads,
                        conns=a.conns,
                        seconds=a.seconds,
                    )
                    results.setdefault((t.name, size), []).append(r)
                    print(
                        f"rep {rep + 1} {size} {t.name:11} {r.req_s:10.0f} req/s "
                        f"{r.bytes_s / 1e9:6.2f} GB/s p99 {r.p99_ms:7.2f} ms "
                        f"errors {r.errors}",
                        flush=True,
                    )
        counts = h.get_json(up.url + "/_count")["paths"]

    def med(name: str, size: str, field: str) -> float:
        return h.median([getattr(r, field) for r in results[(name, size)]])

    def spread(name: str, size: str, field: str, scale: float, fmt: str) -> str:
        xs = [getattr(r, field) / scale for r in results[(name, size)]]
        return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}"

    h.banner(
        f"Warm hits: wrk -t{a.threads} -c{a.conns} -d{a.seconds:g}s, median of {a.reps} "
        f"({h.machine()}, {time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    rows = []
    for t in targets:
        n = t.name
        rows.append(
            [
                n,
                f"{med(n, '1m', 'bytes_s') / 1e9:.2f}",
                spread(n, "1m", "bytes_s", 1e9, "{:.2f}"),
                f"{med(n, '1k', 'req_s'):,.0f}",
                spread(n, "1k", "req_s", 1, "{:,.0f}"),
                f"{med(n, '1k', 'p99_ms'):.1f}",
                str(sum(r.errors for k, rs in results.items() if k[0] == n for r in rs)),
                str(sum(counts.get(p.format(n), 0) for p in objects.values())),
            ]
        )
    print(
        h.table(
            [
                "target",
                "1 MiB GB/s",
                "range",
                "1 KiB req/s",
                "range",
                "1 KiB p99 ms",
                "errors",
                "origin fetches",
            ],
            rows,
        )
    )

    print()
    ratio_rows = []
    for ours in ("ours-1proc", "ours-2proc", "ours-2proc-nolog"):
        r1m = med(ours, "1m", "bytes_s") / med("nginx", "1m", "bytes_s")
        r1k = med(ours, "1k", "req_s") / med("nginx", "1k", "req_s")
        ratio_rows.append(
            [
                ours,
                f"{r1m:.2f}x",
                "met" if r1m >= GOAL_1M else "NOT met",
                h.ratio(med(ours, "1m", "bytes_s"), med("varnish", "1m", "bytes_s")),
                f"{r1k:.2f}x",
                "met" if r1k >= GOAL_1K else "NOT met",
                h.ratio(med(ours, "1k", "req_s"), med("varnish", "1k", "req_s")),
            ]
        )
    print(
        h.table(
            [
                "ours",
                "1 MiB / nginx",
                f"goal ≥{GOAL_1M}x",
                "1 MiB / varnish",
                "1 KiB / nginx",
                f"goal ≥{GOAL_1K}x",
                "1 KiB / varnish",
            ],
            ratio_rows,
        )
    )
    print("\nGB/s is wrk's Transfer/sec (headers + body) in 10^9 bytes/s.")


if __name__ == "__main__":
    main()
