"""Shared plumbing for the cache benchmarks: private server instances on free loopback ports,
readiness checks, a wrk runner and parser, medians and tables.

Every process is started through a `Fleet`, a context manager that stops all of them (SIGTERM to
the process group, then SIGKILL) when the bench ends, fails or is interrupted (Ctrl-C or SIGTERM).
Nothing here touches the system's nginx or Varnish services: configs are generated into a temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONF = BENCH / "conf"
PY = sys.executable
VOD = [PY, "-m", "vodcore.cli"]
HOST = "127.0.0.1"
MiB = 1024 * 1024


# --- ports ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (SO_REUSEPORT workers each have one)."""
    n = 0
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":  # 0A = LISTEN
                n += 1
    return n


# --- processes ------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class Fleet:
    """Processes and temp dirs of one bench run; everything is stopped on exit."""

    def __init__(self, keep: bool = False) -> None:
        self.procs: list[Proc] = []
        self.root = Path(tempfile.mkdtemp(prefix="vodbench-"))
        os.chmod(self.root, 0o755)  # varnishd's unprivileged child must traverse it
        self.keep = keep
        self._old_term: Any = None

    def __enter__(self) -> Fleet:
        def on_term(_sig: int, _frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        self._old_term = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        signal.signal(signal.SIGTERM, self._old_term)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        return d

    def start(
        self, name: str, cmd: Sequence[str], cwd: Path = ROOT, env: dict[str, str] | None = None
    ) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # its own process group: stopped as a unit
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        p = Proc(name, popen, log)
        self.procs.append(p)
        return p

    def stop(self, p: Proc, grace: float = 5.0) -> None:
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGTERM)
            try:
                p.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive its leader (nginx workers, varnish's child): kill what is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=2)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()

    def tail(self, p: Proc, n: int = 20) -> str:
        try:
            return "\n".join(p.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_listening(
    fleet: Fleet, procs: Sequence[Proc], port: int, count: int = 1, timeout: float = 30.0
) -> None:
    """Wait until `count` sockets listen on `port`; fail early if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.popen.poll() is not None:
                raise BenchError(f"{p.name} exited with {p.popen.returncode}:\n{fleet.tail(p)}")
        if listeners(port) >= count:
            return
        time.sleep(0.05)
    raise BenchError(f"{[p.name for p in procs]} not listening on {port} after {timeout}s")


# --- HTTP helpers (blocking; for setup and counters, not for measuring) ---------------------


def get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    return json.loads(get(url, headers)[2])


def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """POST a JSON body; the decoded JSON answer (BenchError on a 4xx/5xx)."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise BenchError(f"POST {url}: {e.code} {e.read()[:200]!r}") from None


# --- the servers ----------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test: its label, base URL and processes."""

    name: str
    url: str
    port: int
    procs: list[Proc]


def start_upstream(
    fleet: Fleet,
    *,
    delay_ms: float = 0,
    max_age: int = 3600,
    seg_bytes: int = 64 * 1024,
    name: str = "upstream",
) -> Target:
    port = free_port()
    p = fleet.start(
        name,
        [
            PY,
            str(BENCH / "upstream.py"),
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
            "--max-age",
            str(max_age),
            "--seg-bytes",
            str(seg_bytes),
        ],
    )
    wait_listening(fleet, [p], port)
    return Target(name, f"http://{HOST}:{port}", port, [p])


def write_config(
    fleet: Fleet, name: str, edge_bytes: int | None = None, shield_bytes: int | None = None
) -> Path | None:
    """A vodstack TOML config with the given cache budgets (None: the defaults)."""
    lines = []
    if edge_bytes is not None:
        lines += ["[edge]", f"cache_bytes = {edge_bytes}"]
    if shield_bytes is not None:
        lines += ["[shield]", f"cache_bytes = {shield_bytes}"]
    if not lines:
        return None
    path = fleet.dir("conf") / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def vod_source(fleet: Fleet) -> Path:
    """The vodstack tree the `vod` processes run from: the working tree, or with
    VODBENCH_SRC=DIR a checkout there, or with VODBENCH_SRC=REV (e.g. HEAD) `git archive REV`
    exported into the run's temp dir (read-only for the repo; useful while the working tree is
    mid-edit)."""
    src = os.environ.get("VODBENCH_SRC")
    if not src:
        return ROOT
    if Path(src).is_dir():
        return Path(src).resolve()
    dest = fleet.root / "src"
    if not dest.is_dir():
        dest.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", src], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        print(f"vod runs from `git archive {src}` in {dest}", flush=True)
    return dest


def start_vod(
    fleet: Fleet,
    tier: str,
    upstream: str,
    *,
    procs: int = 1,
    name: str | None = None,
    config: Path | None = None,
    access_log: bool = True,
    control: str | None = None,
) -> Target:
    """`vod edge --tokens off` or `vod shield` with `procs` processes sharing one port
    (aiohttp's run_app binds with SO_REUSEPORT, so the kernel spreads connections). Each
    process gets its own data directory, so each has its own disk cache tier."""
    name = name or f"{tier}x{procs}"
    port = free_port()
    cmd = [*VOD, tier, "--upstream", upstream, "--port", str(port)]
    if tier == "edge":
        # tokens off (a generic caching proxy) unless a control URL for public keys is given
        cmd += ["--tokens", "on", "--control", control] if control else ["--tokens", "off"]
    if not access_log:
        cmd += ["--access-log", "off"]
    if config is not None:
        cmd += ["--config", str(config)]
    src = vod_source(fleet)
    env = {} if src == ROOT else {"PYTHONPATH": str(src)}
    started = [
        fleet.start(
            f"{name}-{i}", [*cmd, "--data", str(fleet.dir(f"{name}-{i}"))], cwd=src, env=env
        )
        for i in range(procs)
    ]
    wait_listening(fleet, started, port, count=procs)
    return Target(name, f"http://{HOST}:{port}", port, started)


@dataclass
class Control:
    url: str
    data: Path
    operator_key: str


def start_control(fleet: Fleet, prepare: Callable[[Path], None] | None = None) -> Control:
    """`vod control` with an operator key; `prepare(data_dir)` runs before it starts (e.g. to
    insert rows into its SQLite database)."""
    data = Path(fleet.dir("control"))
    key = subprocess.run(
        [*VOD, "keys", "create", "--data", str(data), "--role", "operator"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.strip()  # fmt: skip
    if prepare is not None:
        prepare(data)
    port = free_port()
    p = fleet.start("control", [*VOD, "control", "--data", str(data), "--port", str(port)])
    wait_listening(fleet, [p], port)
    return Control(f"http://{HOST}:{port}", data, key)


def start_cdn(
    fleet: Fleet, control: str, origin: str, *, edges: int, shields: int, tokens: bool
) -> list[str]:
    """`shields` times `vod shield` on `origin` and `edges` times `vod edge` over them, following
    `control`'s purge log, access logs off; returns the edges' URLs."""

    def start(tier: str, i: int, upstream: str, extra: list[str]) -> str:
        port = free_port()
        cmd = [*VOD, tier, "--upstream", upstream, "--control", control, "--port", str(port),
               "--data", str(fleet.dir(f"{tier}{i}")), "--access-log", "off", *extra]  # fmt: skip
        wait_listening(fleet, [fleet.start(f"{tier}{i}", cmd)], port)
        return f"http://{HOST}:{port}"

    shield_urls = ",".join(start("shield", i, origin, []) for i in range(shields))
    mode = ["--tokens", "on" if tokens else "off"]
    return [start("edge", i, shield_urls, mode) for i in range(edges)]


def start_nginx(
    fleet: Fleet,
    upstream_port: int,
    *,
    name: str = "nginx",
    lock: bool = True,
    background_update: bool = False,
) -> Target:
    """nginx 2 workers, proxy_cache on disk (page cache in practice), served by sendfile.

    lock: `proxy_cache_lock on` — one request fills, the others poll for the entry every
    500 ms. background_update: `proxy_cache_use_stale updating` + `proxy_cache_background_update
    on` — an expired entry is served stale while one subrequest refreshes it.
    """
    port = free_port()
    prefix = fleet.dir(name)
    directives = []
    if lock:
        directives += [
            "proxy_cache_lock on;",
            "proxy_cache_lock_timeout 30s;",
            "proxy_cache_lock_age 30s;",
        ]
    if background_update:
        directives += ["proxy_cache_use_stale updating;", "proxy_cache_background_update on;"]
    conf = Template((CONF / "nginx.conf.tmpl").read_text()).substitute(
        user_line="user root;" if os.geteuid() == 0 else "",
        prefix=prefix,
        port=port,
        upstream_port=upstream_port,
        cache_directives="\n".join("            " + d for d in directives),
    )
    path = prefix / "nginx.conf"
    path.write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = fleet.start(name, [nginx, "-c", str(path), "-p", str(prefix), "-g", "daemon off;"])
    wait_listening(fleet, [p], port, count=1)
    return Target(name, f"http://{HOST}:{port}", port, [p])


def start_varnish(
    fleet: Fleet, upstream_port: int, *, name: str = "varnish", storage: str = "malloc,256m"
) -> Target:
    port = free_port()
    work = fleet.dir(name)
    vcl = work / "bench.vcl"
    vcl.write_text(
        Template((CONF / "varnish.vcl.tmpl").read_text()).substitute(upstream_port=upstream_port)
    )
    os.chmod(vcl, 0o644)
    varnishd = shutil.which("varnishd") or "/usr/sbin/varnishd"
    p = fleet.start(
        name,
        [
            varnishd,
            "-F",
            "-a",
            f"{HOST}:{port}",
            "-f",
            str(vcl),
            "-s",
            storage,
            "-n",
            str(work / "n"),
            "-p",
            "thread_pools=2",
        ],
    )
    wait_listening(fleet, [p], port, count=1)
    return Target(name, f"http://{HOST}:{port}", port, [p])


# --- wrk ------------------------------------------------------------------------------------

_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class WrkResult:
    req_s: float
    bytes_s: float  # wrk's Transfer/sec (headers + body), in bytes
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors + non-2xx/3xx
    raw: str


def parse_wrk(out: str) -> WrkResult:
    def num(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.M)
        if not m:
            raise BenchError(f"wrk output lacks {pattern!r}:\n{out}")
        return m

    req_s = float(num(r"^Requests/sec:\s+([\d.]+)").group(1))
    t = num(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)")
    bytes_s = float(t.group(1)) * _UNITS[t.group(2)]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(m.group(1)) * _TIME[m.group(2)] * 1000 if m else float("nan")

    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return WrkResult(req_s, bytes_s, pct("50"), pct("99"), errors, out)


def wrk(url: str, *, threads: int = 2, conns: int = 64, seconds: float = 10) -> WrkResult:
    exe = shutil.which("wrk")
    if not exe:
        raise BenchError("wrk not found: run bench/setup.sh")
    cmd = [exe, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise BenchError(f"wrk failed: {out.stderr}{out.stdout}")
    return parse_wrk(out.stdout)


# --- numbers and tables ---------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, p in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def banner(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def machine() -> str:
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // (1024 * 1024)
    return f"{os.cpu_count()} cores, {mem} GiB, loopback"


@contextlib.contextmanager
def fleet_or_exit(keep: bool = False) -> Iterator[Fleet]:
    """A Fleet whose BenchError becomes a one-line message and exit status 1."""
    try:
        with Fleet(keep=keep) as f:
            yield f
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted; every process stopped", file=sys.stderr)
        raise SystemExit(130) from None
