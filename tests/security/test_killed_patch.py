"""Issue 11, finding 9: a PATCH whose client dies mid-body keeps its progress up to the last
durable byte, whichever way the connection ends: the client process SIGKILLed (a real curl
sending a large body at a limited rate), the socket reset (RST, SO_LINGER 0), or the client
simply falling silent (the body-read timeout ends it). Afterwards HEAD reports an offset > 0,
the bytes up to it are exactly the client's, and a resumed PATCH completes the upload with
the right sha256 (tus 1.0.0 §6 PATCH: "the Server SHOULD accept and store as much as
possible")."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.backends import ENV_NAMES, Backend
from tests.conftest import free_port
from tests.integration.test_control import _make_key
from tests.integration.test_tus import OCTETS, LiveControl, patch, sid_of, stored_source
from tests.procs import VodProcess, wait_http
from vodcore.config import Settings

MiB = 1024 * 1024
SIZE = 48 * MiB
KILL_AFTER = 12 * MiB  # on disk before the client dies


@pytest.fixture
def live(tmp_path: Path, backend: Backend) -> Iterator[LiveControl]:
    # a short body-read timeout, so the silent client of one test is noticed in seconds
    lc = LiveControl(tmp_path / "var", backend=backend, body_timeout_seconds=2.0)
    try:
        yield lc
    finally:
        lc.close()


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "body.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def part_size(live: LiveControl, sid: str) -> int:
    try:
        return (live.uploads_dir / f"{sid}.part").stat().st_size
    except FileNotFoundError:
        return 0


def head_offset(live: LiveControl, url: str) -> int:
    r = requests.head(url, headers=live.auth(), timeout=30)
    assert r.status_code == 200, r.text
    return int(r.headers["Upload-Offset"])


def check_kept_and_resume(live: LiveControl, url: str, vid: str, data: bytes) -> None:
    """Once the server has noticed the dead connection and kept what arrived, the offset is
    past 0 and `.part` holds exactly it (while the body is still being written, `.part` runs
    ahead of the last checkpoint); the bytes up to it are the client's; resuming from it
    completes with the right sha256."""
    sid = sid_of(url)

    def settled() -> bool:
        offset = head_offset(live, url)
        return offset > 0 and offset == part_size(live, sid)

    for _ in range(3):  # a 409 (the dead body still finishing): HEAD again, as clients do
        wait_for(settled, "the offset to reflect the bytes on disk")
        offset = head_offset(live, url)
        assert offset >= KILL_AFTER - 4 * MiB  # at most the batch in flight is lost
        with open(live.uploads_dir / f"{sid}.part", "rb") as f:
            assert f.read(offset) == data[:offset]
        r = patch(url, live.auth(), offset, data[offset:])
        if r.status_code != 409:
            break
    assert r.status_code == 204, r.text
    assert int(r.headers["Upload-Offset"]) == SIZE
    assert hashlib.sha256(stored_source(live, vid)).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_sigkilled_curl_keeps_its_progress(live: LiveControl, payload: Path, framing: str) -> None:
    """curl sends the file with a Content-Length, or from stdin with chunked framing."""
    url, vid = live.create(SIZE)
    source = str(payload) if framing == "content-length" else "-"
    curl = subprocess.Popen(
        ["curl", "-sS", "-X", "PATCH", "--limit-rate", "8M", "-T", source,
         "-H", f"Authorization: {live.auth()['Authorization']}", "-H", "Tus-Resumable: 1.0.0",
         "-H", f"Content-Type: {OCTETS}", "-H", "Upload-Offset: 0", url],
        stdin=payload.open("rb"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: part_size(live, sid_of(url)) >= KILL_AFTER, "12 MiB on disk")
        curl.send_signal(signal.SIGKILL)
    finally:
        curl.kill()
        curl.wait(10)
    check_kept_and_resume(live, url, vid, payload.read_bytes())


def _send_partial(live: LiveControl, url: str, data: bytes) -> socket.socket:
    """A raw PATCH of the whole body that stops once KILL_AFTER bytes are on the server's disk;
    returns the still-open socket."""
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=30)
    head = (
        f"PATCH {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Authorization: {live.auth()['Authorization']}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: {OCTETS}\r\nUpload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode())
    sent, chunk = 0, 256 * 1024
    while part_size(live, sid_of(url)) < KILL_AFTER:
        assert sent < len(data) - chunk, "the server wrote nothing to disk"
        sock.sendall(data[sent : sent + chunk])
        sent += chunk
    return sock


def test_reset_connection_keeps_its_progress(live: LiveControl, payload: Path) -> None:
    url, vid = live.create(SIZE)
    data = payload.read_bytes()
    sock = _send_partial(live, url, data)
    # SO_LINGER on with a zero timeout: close() sends RST, not FIN
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    check_kept_and_resume(live, url, vid, data)


def test_silent_client_keeps_its_progress(live: LiveControl, payload: Path) -> None:
    url, vid = live.create(SIZE)
    data = payload.read_bytes()
    sock = _send_partial(live, url, data)
    try:  # the client stays connected and sends nothing more
        check_kept_and_resume(live, url, vid, data)
    finally:
        sock.close()


def test_a_stalled_body_shows_its_durable_bytes_before_it_times_out(
    tmp_path: Path, backend: Backend, payload: Path
) -> None:
    """The finding's exact picture: 12 MiB on disk, HEAD said 0 while the server still waited
    for the rest of a body that will never come. Checkpoints make the durable bytes the
    offset while the connection is still open (a SIGSTOPped curl sends nothing more, closes
    nothing; the body timeout here is far away)."""
    live = LiveControl(tmp_path / "var", backend=backend, body_timeout_seconds=600.0)
    try:
        url, vid = live.create(SIZE)
        curl = subprocess.Popen(
            ["curl", "-sS", "-X", "PATCH", "--limit-rate", "4M", "-T", str(payload),
             "-H", f"Authorization: {live.auth()['Authorization']}",
             "-H", "Tus-Resumable: 1.0.0", "-H", f"Content-Type: {OCTETS}",
             "-H", "Upload-Offset: 0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            # 20 MiB: past what loopback's socket buffers let arrive in one burst, so the
            # body has run for over a second (a checkpoint is due) whatever the machine's load
            wait_for(lambda: part_size(live, sid_of(url)) >= 20 * MiB, "20 MiB on disk")
            curl.send_signal(signal.SIGSTOP)
            # well within the old fixed 60 s body-idle timeout, which alone used to move it
            wait_for(lambda: head_offset(live, url) > 0, "HEAD to show the durable bytes", 30)
            offset = head_offset(live, url)
            with open(live.uploads_dir / f"{sid_of(url)}.part", "rb") as f:
                assert f.read(offset) == payload.read_bytes()[:offset]
            curl.send_signal(signal.SIGKILL)  # then the connection goes: resume
        finally:
            curl.kill()
            curl.wait(10)
        check_kept_and_resume(live, url, vid, payload.read_bytes())
    finally:
        live.close()


def test_a_killed_server_keeps_the_checkpointed_bytes(tmp_path: Path, payload: Path) -> None:
    """`vod control` itself SIGKILLed mid-PATCH (no handler runs, nothing is flushed at the
    end): the checkpoints already moved the offset, so the restarted server resumes from a
    durable offset > 0 whose bytes are the client's. Before checkpoints, only a PATCH that
    ended was ever committed: all of this one was lost. Embedded only (SQLite and `.part`
    on this filesystem: the database outlives the process either way)."""
    data = tmp_path / "var"
    data.mkdir()
    settings = Settings(data_dir=data)
    env = dict.fromkeys(ENV_NAMES.values(), "")  # not a developer's own VOD_* settings
    key = _make_key(settings, "creator")
    auth = {"Authorization": f"Bearer {key}", "Tus-Resumable": "1.0.0"}

    def serve(name: str) -> tuple[VodProcess, str]:
        port = free_port()
        p = VodProcess(["control", "--data", str(data), "--port", str(port)],
                       tmp_path / f"{name}.log", env=env)  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=p.proc)
        return p, f"http://127.0.0.1:{port}"

    first, api = serve("control-1")
    curl = None
    try:
        r = requests.post(f"{api}/v1/tus/", headers={**auth, "Upload-Length": str(SIZE)},
                          timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text
        sid, vid = sid_of(r.headers["Location"]), r.headers["X-Video-Id"]
        part = settings.uploads_dir / f"{sid}.part"
        curl = subprocess.Popen(
            ["curl", "-sS", "-X", "PATCH", "--limit-rate", "4M", "-T", str(payload),
             "-H", f"Authorization: {auth['Authorization']}", "-H", "Tus-Resumable: 1.0.0",
             "-H", f"Content-Type: {OCTETS}", "-H", "Upload-Offset: 0", f"{api}/v1/tus/{sid}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # 20 MiB: past one burst of loopback's socket buffers, so a checkpoint was due
        wait_for(lambda: part.exists() and part.stat().st_size >= 20 * MiB, "20 MiB on disk")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        if curl is not None:
            curl.kill()
            curl.wait(10)
        first.stop()
    second, api = serve("control-2")
    try:
        url = f"{api}/v1/tus/{sid}"
        h = requests.head(url, headers=auth, timeout=30)
        offset = int(h.headers["Upload-Offset"])
        assert offset >= 4 * MiB  # the checkpoints before the kill
        data_bytes = payload.read_bytes()
        with open(part, "rb") as f:
            assert f.read(offset) == data_bytes[:offset]
        r = requests.patch(
            url,
            headers={**auth, "Content-Type": OCTETS, "Upload-Offset": str(offset)},
            data=data_bytes[offset:],
            timeout=60,
        )
        assert r.status_code == 204, r.text
        stored = (settings.store_dir / "source" / vid / "original").read_bytes()
        assert hashlib.sha256(stored).digest() == hashlib.sha256(data_bytes).digest()
    finally:
        assert second.stop() == 0, second.output()
    assert "Traceback" not in second.output(), second.output()
