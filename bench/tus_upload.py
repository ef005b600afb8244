"""tus upload over loopback (issue 6: "tus upload of a 1 GB file over loopback: goal ≥ 0.8x the
raw write throughput of the same storage; killed mid-way and resumed, the stored object's
sha256 equals the source's").

    .venv/bin/python bench/tus_upload.py [--size-mib 1024] [--chunk-mib 64] [--kill-at 0.5]
        [--rounds 3]

1. A random file of `--size-mib` MiB in the run's temp dir (removed at the end), sha256 noted.
2. `--rounds` rounds (default 3), each measured back to back, so a busy neighbour on the shared
   machine weighs on all its parts alike:
   - raw write throughput of that filesystem, two ways: the file copied to a new file there
     with an 8 MiB buffer, then fsync (`cp` + `sync`, through the page cache; the source is in
     the page cache, as it is for the clients), and the same with O_DIRECT (`dd oflag=direct`:
     what the device takes, no page cache);
   - a tus upload to `vod control` (SQLite, filesystem object store, data dir in the same temp
     dir, rate limits off) by each of two real clients, each in its own process:
     - curl: POST creates the upload, then one PATCH streams the whole file (`curl -T`), as
       tus-js-client does by default (chunkSize Infinity): little client CPU, so the figure is
       the server's;
     - tuspy: PATCHes in `--chunk-mib` chunks, one at a time (this file run with --client);
       the Python client needs as much CPU as the server, on the same 2 cores.
     MB/s = size / the client's wall time (creation to last 204, completion included: the last
     PATCH moves the source into the store). sha256 of every stored object
     (store/source/{videoId}/original) against the file's.
   The verdict: the median over the rounds of upload / raw write (the page-cache copy), per
   client; the O_DIRECT figure is shown beside it.
3. A second upload of the same file with tuspy: the client is killed (SIGKILL) once HEAD
   reports ≥ `--kill-at` of the bytes, i.e. with the next chunk in flight; a new client
   process resumes from HEAD's offset (tuspy asks HEAD when given the upload URL); the stored
   object's sha256 is compared with the source's.

On this project's machines (firecracker VMs) writing through the page cache is slow and its
speed swings (every fresh page of cache is a fault in the host: 145-724 MB/s for the same
copy), while O_DIRECT is steady (~1 GB/s); control writes whole blocks with O_DIRECT
(control/upload_files.py), so the ratio to the page-cache copy swings with it.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
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


CLIENTS = ("curl", "tuspy")


@dataclass(frozen=True)
class Upload:
    seconds: float
    amplification: float  # bytes control wrote to storage / size
    ok: bool  # stored sha256 = source sha256
    server_cpu: float
    client_cpu: float


@dataclass
class Round:
    raw_s: float  # page-cache copy + fsync
    direct_s: float  # O_DIRECT copy + fsync
    uploads: dict[str, Upload]


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


def raw_write_direct(src: Path, dst: Path) -> float:
    """Seconds to copy `src` to a new file `dst` with O_DIRECT from an 8 MiB page-aligned
    buffer (the last partial block written buffered), fsync included."""
    t = time.monotonic()
    buf = mmap.mmap(-1, BUF)
    view = memoryview(buf)
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        with open(src, "rb", buffering=0) as inp:
            at = 0
            while n := inp.readinto(view):
                whole = n - n % 4096
                if whole:
                    os.pwrite(out, view[:whole], at)
                if whole < n:  # the end of the file: not a whole block
                    with open(dst, "r+b") as tail:
                        tail.seek(at + whole)
                        tail.write(view[whole:n])
                at += n
        os.fsync(out)
    finally:
        os.close(out)
        view.release()
        buf.close()
    took = time.monotonic() - t
    dst.unlink()
    return took


def curl_upload(endpoint: str, key: str, src: Path, size: int) -> tuple[float, float]:
    """POST (creation), then one PATCH of the whole file with curl; (seconds, curl's CPU s)."""
    t = time.monotonic()
    req = urllib.request.Request(endpoint, method="POST", headers={
        "Tus-Resumable": "1.0.0", "Upload-Length": str(size), "Authorization": f"Bearer {key}",
        "Upload-Metadata": "filename YmVuY2gubXA0",  # bench.mp4
    })  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        url = urllib.parse.urljoin(endpoint, r.headers["Location"])
    p = subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH", "-T", str(src),
         "-H", "Tus-Resumable: 1.0.0", "-H", "Upload-Offset: 0",
         "-H", "Content-Type: application/offset+octet-stream",
         "-H", f"Authorization: Bearer {key}", "-H", "Expect:", url],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None
    status = p.stdout.read().decode()
    cpu = wait_cpu(p)
    took = time.monotonic() - t
    if p.returncode != 0 or status != "204":
        raise h.BenchError(f"curl PATCH: exit {p.returncode}, HTTP {status}")
    return took, cpu


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

        # 1. rounds of (raw writes, one uninterrupted upload per client)
        rounds: list[Round] = []
        for i in range(max(1, a.rounds)):
            raw_s = raw_write(src, fleet.root / "raw-copy.bin")
            direct_s = raw_write_direct(src, fleet.root / "raw-direct.bin")
            r = Round(raw_s, direct_s, {})
            for name in CLIENTS:
                before = stored_sources(ctl.data)
                server = ctl.procs[0].popen.pid
                w0, c0 = disk_writes(server), cpu_seconds(server)
                if name == "curl":
                    up_s, client_cpu = curl_upload(endpoint, ctl.key, src, size)
                else:
                    t = time.monotonic()
                    p = fleet.start(f"client-1.{i}", base)
                    client_cpu = wait_cpu(p.popen)
                    up_s = time.monotonic() - t
                    if p.popen.returncode != 0:
                        raise h.BenchError(f"tus client failed:\n{fleet.tail(p)}")
                amplification = (disk_writes(server) - w0) / size
                server_cpu = cpu_seconds(server) - c0
                new = stored_sources(ctl.data) - before
                if len(new) != 1:
                    raise h.BenchError(f"expected one new stored source, found {new}")
                obj1 = new.pop()
                ok = sha256_of(obj1) == digest
                obj1.unlink()  # room for the next one
                r.uploads[name] = Upload(up_s, amplification, ok, server_cpu, client_cpu)
                print(f"round {i + 1}: raw write {size / raw_s / 1e6:,.0f} MB/s (O_DIRECT "
                      f"{size / direct_s / 1e6:,.0f}), {name} upload {size / up_s / 1e6:,.0f} "
                      f"MB/s ({raw_s / up_s:.2f}x), CPU s control {server_cpu:.2f} client "
                      f"{client_cpu:.2f}, sha256 {'equal' if ok else 'DIFFERENT'}",
                      flush=True)  # fmt: skip
            rounds.append(r)
        ok1 = all(u.ok for r in rounds for u in r.uploads.values())

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
    h.banner(
        f"tus upload over loopback: {a.size_mib} MiB random file, curl (one PATCH) and tuspy "
        f"({a.chunk_mib} MiB chunks), `vod control` (SQLite, filesystem store, same "
        f"filesystem), access log {a.access_log} ({h.machine()}, "
        f"{time.strftime('%Y-%m-%d', time.localtime(started))})"
    )
    print(f"command: `.venv/bin/python {command.strip()}`\n")
    rows = []
    for i, r in enumerate(rounds):
        for name, u in r.uploads.items():
            rows.append([
                str(i + 1), f"{size / r.raw_s / 1e6:,.0f}", f"{size / r.direct_s / 1e6:,.0f}",
                name, f"{size / u.seconds / 1e6:,.0f}", f"{r.raw_s / u.seconds:.2f}x",
                f"{r.direct_s / u.seconds:.2f}x", f"{u.amplification:.2f}",
                f"{u.server_cpu:.2f}", f"{u.client_cpu:.2f}",
            ])  # fmt: skip
    print(h.table(
        ["round", "raw write MB/s (8 MiB buffer + fsync)", "O_DIRECT write MB/s", "client",
         "tus upload MB/s (create → last 204)", "upload / raw", "upload / O_DIRECT",
         "bytes written / size", "control CPU s", "client CPU s"],
        rows,
    ))  # fmt: skip
    print()
    for name in CLIENTS:
        ratio = statistics.median(r.raw_s / r.uploads[name].seconds for r in rounds)
        direct = statistics.median(r.direct_s / r.uploads[name].seconds for r in rounds)
        print(f"{name}: median upload / raw write {ratio:.2f}x (goal ≥{GOAL}x: "
              f"{'met' if ratio >= GOAL else 'NOT met'}); upload / O_DIRECT write "
              f"{direct:.2f}x")  # fmt: skip
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
