"""tus upload over loopback (issue 6: "tus upload of a 1 GB file over loopback: goal ≥ 0.8x the
raw write throughput of the same storage; killed mid-way and resumed, the stored object's
sha256 equals the source's").

    .venv/bin/python bench/tus_upload.py [--size-mib 1024] [--chunk-mib 64] [--kill-at 0.5]

1. A random file of `--size-mib` MiB in the run's temp dir (removed at the end), sha256 noted.
2. `--rounds` rounds (default 3), each a pair measured back to back, so a busy neighbour on the
   shared machine weighs on both halves of a pair alike:
   - raw write throughput of that filesystem: the file copied to a new file there with an
     8 MiB buffer, then fsync (the source is in the page cache, as it is for the client);
   - a tus upload to `vod control` (SQLite, filesystem object store, data dir in the same temp
     dir, rate limits off): a tuspy client (a separate process running this file with
     --client) creates the upload and PATCHes it in `--chunk-mib` chunks; MB/s = size / the
     client's wall time (creation to last 204, completion included: the last PATCH moves the
     source into the store). sha256 of the stored object (store/source/{videoId}/original)
     against the file's.
   The ratio is the median of the rounds' ratios.
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
import statistics
import subprocess
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_cpu(popen: subprocess.Popen[bytes]) -> float:
    """Reap the child and return the CPU seconds it used (user + system)."""
    _, status, usage = os.wait4(popen.pid, 0)
    popen.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def stored_sources(data: Path) -> set[Path]:
    return set((data / "store" / "source").glob("*/original"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3, help="raw write + upload pairs")
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
        ctl = pa.start_controls(
            fleet, "tus", pa.BACKENDS["sqlite"], access_log=a.access_log == "on"
        )
        endpoint = f"{ctl.url}/v1/tus/"
        base = [h.PY, str(Path(__file__).resolve()), "--client", "--endpoint", endpoint,
                "--key", ctl.key, "--file", str(src), "--chunk-mib", str(a.chunk_mib)]  # fmt: skip

        # 1. rounds of (raw write, one uninterrupted upload)
        # raw s, upload s, amplification, sha ok, control CPU s, client CPU s
        rounds: list[tuple[float, float, float, bool, float, float]] = []
        for i in range(max(1, a.rounds)):
            raw_s = raw_write(src, fleet.root / "raw-copy.bin")
            before = stored_sources(ctl.data)
            server = ctl.procs[0].popen.pid
            w0, c0 = disk_writes(server), cpu_seconds(server)
            t = time.monotonic()
            p = fleet.start(f"client-1.{i}", base)
            client_cpu = wait_cpu(p.popen)
            up_s = time.monotonic() - t
            amplification = (disk_writes(server) - w0) / size
            server_cpu = cpu_seconds(server) - c0
            if p.popen.returncode != 0:
                raise h.BenchError(f"tus client failed:\n{fleet.tail(p)}")
            new = stored_sources(ctl.data) - before
            if len(new) != 1:
                raise h.BenchError(f"expected one new stored source, found {new}")
            obj1 = new.pop()
            ok = sha256_of(obj1) == digest
            obj1.unlink()  # room for the next one
            rounds.append((raw_s, up_s, amplification, ok, server_cpu, client_cpu))
            print(f"round {i + 1}: raw write {size / raw_s / 1e6:,.0f} MB/s, tus upload "
                  f"{size / up_s / 1e6:,.0f} MB/s ({raw_s / up_s:.2f}x), CPU s control "
                  f"{server_cpu:.2f} client {client_cpu:.2f}, sha256 "
                  f"{'equal' if ok else 'DIFFERENT'}", flush=True)  # fmt: skip
        ok1 = all(r[3] for r in rounds)

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
    ratios = [r[0] / r[1] for r in rounds]
    ratio = statistics.median(ratios)
    h.banner(
        f"tus upload over loopback: {a.size_mib} MiB random file, tuspy {a.chunk_mib} MiB "
        f"chunks, `vod control` (SQLite, filesystem store, same filesystem), access log "
        f"{a.access_log} ({h.machine()}, {time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    print(f"command: `.venv/bin/python {command.strip()}`\n")
    print(h.table(
        ["round", "raw write MB/s (8 MiB buffer + fsync)", "tus upload MB/s (create → last 204)",
         "tus / raw", "bytes written / size", "control CPU s", "client CPU s", "seconds"],
        [[str(i + 1), f"{size / r[0] / 1e6:,.0f}", f"{size / r[1] / 1e6:,.0f}",
          f"{r[0] / r[1]:.2f}x", f"{r[2]:.2f}", f"{r[4]:.2f}", f"{r[5]:.2f}", f"{r[1]:.2f}"]
         for i, r in enumerate(rounds)],
    ))  # fmt: skip
    print(
        f"\nmedian tus / raw: {ratio:.2f}x (goal ≥{GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})"
    )
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
