"""tus upload over loopback (issue 6: "tus upload of a 1 GB file over loopback: goal ≥ 0.8x the
raw write throughput of the same storage; killed mid-way and resumed, the stored object's
sha256 equals the source's").

    .venv/bin/python bench/tus_upload.py [--size-mib 1024] [--chunk-mib 64] [--kill-at 0.5]

1. A random file of `--size-mib` MiB in the run's temp dir (removed at the end), sha256 noted.
2. Raw write throughput of that filesystem: the file copied to a new file there with an 8 MiB
   buffer, then fsync (the source is in the page cache, as it is for the upload's client).
3. `vod control` (SQLite, filesystem object store, data dir in the same temp dir, rate limits
   off); a tuspy client (a separate process running this file with --client) creates the
   upload and PATCHes it in `--chunk-mib` chunks; MB/s = size / the client's wall time
   (creation to last 204, completion included: the last PATCH moves the source into the
   store). sha256 of the stored object (store/source/{videoId}/original) against the file's.
4. A second upload of the same file: the client is killed (SIGKILL) once HEAD reports
   ≥ `--kill-at` of the bytes, i.e. with the next chunk in flight; a new client process resumes
   from HEAD's offset (tuspy asks HEAD when given the upload URL); the stored object's sha256
   is compared with the source's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import harness as h
import playback_auth as pa

GOAL = 0.8
BUF = 8 * h.MiB


def client(a: argparse.Namespace) -> None:
    """The tuspy client (own process, so it can be killed): prints the upload URL, uploads."""
    from tusclient import client as tc

    c = tc.TusClient(a.endpoint, headers={"Authorization": f"Bearer {a.key}"})
    chunk = a.chunk_mib * h.MiB
    if a.url:
        up = c.uploader(a.file, url=a.url, chunk_size=chunk)
        print(f"resuming at {up.offset}", flush=True)
    else:
        up = c.uploader(
            a.file, chunk_size=chunk, metadata={"filename": "bench.mp4", "filetype": "video/mp4"}
        )
        up.set_url(up.create_url())
        print(up.url, flush=True)
    up.upload()


def make_file(path: Path, size: int) -> str:
    d = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(BUF, left))
            d.update(block)
            f.write(block)
            left -= len(block)
    return d.hexdigest()


def sha256_of(path: Path) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BUF):
            d.update(block)
    return d.hexdigest()


def raw_write(src: Path, dst: Path) -> float:
    """Seconds to copy `src` to a new file `dst` with an 8 MiB buffer, fsync included."""
    t = time.monotonic()
    with open(src, "rb") as inp, open(dst, "wb") as out:
        while block := inp.read(BUF):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    took = time.monotonic() - t
    dst.unlink()
    return took


def head_offset(url: str, key: str) -> int | None:
    status, headers, _ = _head(url, key)
    return int(headers["Upload-Offset"]) if status == 200 else None


def _head(url: str, key: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url, method="HEAD", headers={"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers.items()), b""
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), b""


def disk_writes(pid: int) -> int:
    """Bytes the process caused to be written to storage (/proc/PID/io write_bytes)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def stored_sources(data: Path) -> set[Path]:
    return set((data / "store" / "source").glob("*/original"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--access-log", choices=("on", "off"), default="on")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        client(a)
        return
    command = "bench/tus_upload.py " + " ".join(sys.argv[1:])
    started = time.time()
    size = a.size_mib * h.MiB
    with h.fleet_or_exit(keep=a.keep) as fleet:
        src = fleet.root / "source.bin"
        print(f"writing {a.size_mib} MiB of random bytes to {src}", flush=True)
        digest = make_file(src, size)
        raw_s = raw_write(src, fleet.root / "raw-copy.bin")
        raw_mbs = size / raw_s / 1e6
        print(f"raw write (8 MiB buffer + fsync): {raw_mbs:,.0f} MB/s", flush=True)
        ctl = pa.start_controls(
            fleet, "tus", pa.BACKENDS["sqlite"], access_log=a.access_log == "on"
        )
        endpoint = f"{ctl.url}/v1/tus/"
        base = [h.PY, str(Path(__file__).resolve()), "--client", "--endpoint", endpoint,
                "--key", ctl.key, "--file", str(src), "--chunk-mib", str(a.chunk_mib)]  # fmt: skip

        # 1. one uninterrupted upload
        before = stored_sources(ctl.data)
        w0 = disk_writes(ctl.procs[0].popen.pid)
        t = time.monotonic()
        p = fleet.start("client-1", base)
        p.popen.wait(timeout=3600)
        up_s = time.monotonic() - t
        amplification = (disk_writes(ctl.procs[0].popen.pid) - w0) / size
        if p.popen.returncode != 0:
            raise h.BenchError(f"tus client failed:\n{fleet.tail(p)}")
        new = stored_sources(ctl.data) - before
        if len(new) != 1:
            raise h.BenchError(f"expected one new stored source, found {new}")
        obj1 = new.pop()
        ok1 = sha256_of(obj1) == digest
        up_mbs = size / up_s / 1e6
        print(f"tus upload: {up_mbs:,.0f} MB/s, sha256 {'equal' if ok1 else 'DIFFERENT'}",
              flush=True)  # fmt: skip
        obj1.unlink()  # room for the second one

        # 2. killed at ~kill-at, resumed by a new client
        before = stored_sources(ctl.data)
        p = fleet.start("client-2", base)
        url = None
        deadline = time.monotonic() + 600
        while url is None and time.monotonic() < deadline:
            if p.popen.poll() is not None:
                raise h.BenchError(f"tus client exited early:\n{fleet.tail(p)}")
            lines = p.log.read_text().splitlines()
            url = lines[0].strip() if lines and lines[0].startswith("http") else None
            time.sleep(0.01)
        if url is None:
            raise h.BenchError("the client never printed its upload URL")
        killed_at = None
        while time.monotonic() < deadline:
            off = head_offset(url, ctl.key)
            if off is not None and off >= a.kill_at * size:
                p.popen.send_signal(signal.SIGKILL)
                p.popen.wait()
                killed_at = off
                break
            if p.popen.poll() is not None:
                raise h.BenchError("the client finished before it could be killed")
            time.sleep(0.02)
        if killed_at is None:
            raise h.BenchError("never reached the kill point")
        time.sleep(0.5)  # let the server notice the cut body and keep what arrived
        resume_from = head_offset(url, ctl.key)
        t = time.monotonic()
        p2 = fleet.start("client-3", [*base, "--url", url])
        p2.popen.wait(timeout=3600)
        resume_s = time.monotonic() - t
        if p2.popen.returncode != 0:
            raise h.BenchError(f"resuming client failed:\n{fleet.tail(p2)}")
        new = stored_sources(ctl.data) - before
        if len(new) != 1:
            raise h.BenchError(f"expected one new stored source, found {new}")
        obj2 = new.pop()
        ok2 = sha256_of(obj2) == digest
        print(f"killed at HEAD offset {killed_at:,}, resumed from {resume_from:,}: sha256 "
              f"{'equal' if ok2 else 'DIFFERENT'}", flush=True)  # fmt: skip
        src.unlink()
    ratio = up_mbs / raw_mbs
    h.banner(
        f"tus upload over loopback: {a.size_mib} MiB random file, tuspy {a.chunk_mib} MiB "
        f"chunks, `vod control` (SQLite, filesystem store, same filesystem), access log "
        f"{a.access_log} ({h.machine()}, {time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    print(f"command: `.venv/bin/python {command.strip()}`\n")
    print(h.table(
        ["measure", "MB/s", "seconds", "/ raw write", f"goal ≥{GOAL}x", "bytes written / size"],
        [
            ["raw write (8 MiB buffer + fsync)", f"{raw_mbs:,.0f}", f"{raw_s:.2f}", "1.00x", "",
             "1.00"],
            ["tus upload (create → last 204)", f"{up_mbs:,.0f}", f"{up_s:.2f}",
             f"{ratio:.2f}x", "met" if ratio >= GOAL else "NOT met", f"{amplification:.2f}"],
        ],
    ))  # fmt: skip
    print()
    print(h.table(
        ["upload", "SIGKILL at HEAD offset", "resumed from HEAD offset", "resume seconds",
         "stored sha256 = source sha256"],
        [
            ["uninterrupted", "", "", "", "yes" if ok1 else "NO"],
            ["killed + resumed", f"{killed_at:,} ({killed_at / size:.0%})",
             f"{resume_from:,} ({(resume_from or 0) / size:.0%})", f"{resume_s:.2f}",
             "yes" if ok2 else "NO"],
        ],
    ))  # fmt: skip
    if not (ok1 and ok2):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
