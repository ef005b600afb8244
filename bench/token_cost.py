"""What checking playback tokens costs the edge on warm hits (issue 4: goal ≤ 5%).

    .venv/bin/python bench/token_cost.py [--reps 3] [--seconds 10] [--seg-bytes 1024]

Two `vod edge` processes (SO_REUSEPORT) with tokens off serve `/v/vid/1/seg-1.m4s`; two with
tokens on serve `/v/vid/{token}/1/seg-1.m4s` with an EdDSA token minted by a real `vod control`
(the edges fetch its JWKS). Both warm, then wrk, interleaved repetitions, medians. Small
segments (1 KiB by default) make per-request costs most visible, so this is the worst case
for the token check. A verified token is remembered until it expires, so the check is one
Ed25519 verification per token per process, then a dictionary lookup per request.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import harness as h

GOAL = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--seg-bytes", type=int, default=1024)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--access-log", choices=("on", "off"), default="on")
    a = ap.parse_args()

    sys.path.insert(0, str(h.ROOT))
    from vodcore.tokens import SigningKeys

    with h.fleet_or_exit(keep=a.keep) as fleet:
        up = h.start_upstream(fleet, seg_bytes=a.seg_bytes)
        data = fleet.dir("control")
        port = h.free_port()
        ctl = fleet.start("control", [*h.VOD, "control", "--data", str(data), "--port", str(port)])
        control = f"http://{h.HOST}:{port}"
        h.wait_listening(fleet, [ctl], port, count=1)
        keys = SigningKeys(Path(data) / "keys").load_or_create()
        token = keys.mint("vid", int(time.time()), 6 * 3600)
        off = h.start_vod(
            fleet, "edge", up.url, procs=2, name="tokens-off", access_log=a.access_log == "on"
        )
        on = h.start_vod(
            fleet,
            "edge",
            up.url,
            procs=2,
            name="tokens-on",
            control=control,
            access_log=a.access_log == "on",
        )
        # tokens-off-long: the same request line length as tokens-on (the token is replaced
        # by an ignored query string), so the checking cost is separated from the cost of a
        # longer request, which tokens in the path carry by design.
        pad = "x" * (len(token) - 2)
        urls = {
            "tokens-off": off.url + "/v/vid/1/seg-1.m4s",
            "tokens-off-long": off.url + f"/v/vid/1/seg-1.m4s?p={pad}",
            "tokens-on": on.url + f"/v/vid/{token}/1/seg-1.m4s",
        }
        for name, url in urls.items():
            for _ in range(40):  # new connections: every process fills and verifies once
                status, _headers, _body = h.get(url)
                if status != 200:
                    raise h.BenchError(f"{name}: status {status}")
            h.wrk(url, conns=a.conns, seconds=2)
        results: dict[str, list[h.WrkResult]] = {n: [] for n in urls}
        for rep in range(a.reps):
            for name, url in urls.items():
                r = h.wrk(url, conns=a.conns, seconds=a.seconds)
                results[name].append(r)
                print(f"rep {rep + 1} {name:10} {r.req_s:10.0f} req/s  errors {r.errors}",
                      flush=True)  # fmt: skip
        off_rps = h.median([r.req_s for r in results["tokens-off"]])
        long_rps = h.median([r.req_s for r in results["tokens-off-long"]])
        on_rps = h.median([r.req_s for r in results["tokens-on"]])
        cost = 1 - on_rps / long_rps
        total = 1 - on_rps / off_rps
        h.banner(
            f"Token cost on warm hits: {a.seg_bytes} B segments, 2 edge processes each, wrk "
            f"-t2 -c{a.conns} -d{a.seconds:g}s, median of {a.reps} ({h.machine()}, "
            f"{time.strftime('%Y-%m-%d')})"
        )
        print(
            h.table(
                ["edge", "req/s (median)", "runs"],
                [
                    [
                        n,
                        f"{h.median([r.req_s for r in rs]):,.0f}",
                        " ".join(f"{r.req_s:,.0f}" for r in rs),
                    ]
                    for n, rs in results.items()
                ],
            )
        )
        verdict = "met" if cost <= GOAL else "NOT met"
        print(
            f"\ntoken checking costs {cost * 100:.1f}% of hit throughput against URLs of the "
            f"same length (goal ≤ {GOAL * 100:.0f}%: {verdict}); with the longer request line "
            f"of a tokened URL, {total * 100:.1f}% against plain short URLs"
        )


if __name__ == "__main__":
    main()
