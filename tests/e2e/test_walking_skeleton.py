"""End to end: `vod up` on the backend `--backend` names (the embedded defaults, or PostgreSQL,
Redis and S3 through VOD_* variables), a real upload with a stock tus client that is cut
mid-body and resumed, the transcoder pool, and playback through edge → shield → origin with
ffmpeg as the player (HLS and DASH). Also the bad input of issue #2."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from tusclient import client as tus_client

from tests.backends import Backend, Backends, read_object, run_sync
from tests.conftest import free_port, make_clip
from tests.faultproxy import CuttingProxy
from tests.procs import wait_http
from vodcore.config import Settings
from vodcore.layout import source_key

pytestmark = pytest.mark.e2e
TUS = {"Tus-Resumable": "1.0.0"}


@dataclass
class Stack:
    data: Path
    control: str
    edge: str
    origin: str
    key: str
    proc: subprocess.Popen[bytes]
    log: Path
    settings: Settings  # what `vod up` runs on
    shield: str = ""
    env: dict[str, str] | None = None  # the backend's VOD_* variables


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, backends: Backends) -> Iterator[Stack]:
    with backends.lease() as backend:
        yield from _stack(tmp_path_factory, backend)


def _stack(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    data = root / "var"
    ports = {t: free_port() for t in ("control", "edge", "shield", "origin")}
    env = {
        **os.environ,
        **backend.env(),
        **{f"VOD_{t.upper()}_PORT": str(p) for t, p in ports.items()},
    }
    vod = [sys.executable, "-m", "vodcore.cli"]
    key = subprocess.run([*vod, "keys", "create", "--data", str(data), "--role", "creator"],
                         check=True, capture_output=True, text=True, timeout=60, env=env
                         ).stdout.strip()  # fmt: skip
    assert re.fullmatch(r"vod_[A-Za-z0-9_-]+", key)
    log = root / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*vod, "up", "--data", str(data)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "vodstack is up" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        s = Stack(data, f"http://127.0.0.1:{ports['control']}",
                  f"http://127.0.0.1:{ports['edge']}", f"http://127.0.0.1:{ports['origin']}",
                  key, proc, log, backend.settings(data),
                  f"http://127.0.0.1:{ports['shield']}", env)  # fmt: skip
        for url in (s.control, s.edge, s.origin, f"http://127.0.0.1:{ports['shield']}"):
            wait_http(url + "/healthz", timeout=10)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _auth(s: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {s.key}"}


def _create(s: Stack, title: str, size: int) -> dict[str, Any]:
    r = requests.post(
        f"{s.control}/v1/uploads",
        headers=_auth(s),
        timeout=10,
        json={"title": title, "sizeBytes": size, "contentType": "video/mp4"},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _wait_state(s: Stack, vid: str, states: set[str], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = requests.get(f"{s.control}/v1/videos/{vid}", timeout=10).json()
        if v["state"] in states:
            return dict(v)
        time.sleep(0.3)
    raise AssertionError(f"{vid} never reached {states}: {v}")


def _play(ffmpeg: str, url: str) -> float:
    """Play a URL with ffmpeg as the client; return the decoded duration in seconds."""
    p = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-i", url, "-f", "null", "-",
         "-progress", "pipe:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    times = [int(v) for v in re.findall(r"^out_time_us=(\d+)$", p.stdout, re.M)]
    assert times, p.stdout
    return max(times) / 1e6


def _origin_hits(s: Stack, path: str) -> int:
    text = (s.data / "logs" / "origin.log").read_text(errors="replace")
    return len(re.findall(rf'"GET {re.escape(path)} HTTP/1\.1" 2\d\d', text))


def test_upload_transcode_and_play_through_every_tier(
    stack: Stack, ffmpeg: str, tmp_path: Path
) -> None:
    s = stack
    clip = make_clip(ffmpeg, tmp_path / "clip.mp4", seconds=4, size="640x360")
    junk = tmp_path / "notes.mp4"
    junk.write_bytes(os.urandom(40_000))

    # A non-video upload is accepted, then fails with a readable reason; it must not disturb
    # the good upload processed alongside it. Uploaded with the `vod upload` CLI.
    bad = subprocess.Popen(
        [sys.executable, "-m", "vodcore.cli", "upload", str(junk), "--title", "junk", "--wait",
         "--quiet", "--api", s.control, "--key", s.key, "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )  # fmt: skip

    # The good clip goes up with tuspy through a proxy that cuts the first PATCH mid-body.
    size = clip.stat().st_size
    up = _create(s, "walking skeleton", size)
    proxy = CuttingProxy(int(s.control.rsplit(":", 1)[1]), cut_after_bytes=size // 2)
    try:
        client = tus_client.TusClient(f"{proxy.url}/v1/tus/", headers=_auth(s))
        uploader = client.uploader(str(clip), url=up["uploadUrl"].replace(s.control, proxy.url),
                                   chunk_size=size, retries=0)  # fmt: skip
        with pytest.raises(Exception):  # noqa: B017 - the socket was cut under the client
            uploader.upload_chunk()
        assert proxy.cuts == 1
    finally:
        proxy.close()
    client = tus_client.TusClient(f"{s.control}/v1/tus/", headers=_auth(s))
    uploader = client.uploader(str(clip), url=up["uploadUrl"], chunk_size=256 * 1024)
    assert uploader.offset < size
    uploader.upload()
    done = requests.post(f"{s.control}/v1/uploads/{up['uploadSessionId']}/complete",
                         headers=_auth(s), timeout=10)  # fmt: skip
    assert done.status_code == 202 and done.json()["videoId"] == up["videoId"]
    src = run_sync(lambda: read_object(s.settings, source_key(up["videoId"])))
    assert src == clip.read_bytes()  # nothing lost across the cut

    v = _wait_state(s, up["videoId"], {"READY", "FAILED"})
    assert v["state"] == "READY", v
    assert abs(v["durationSeconds"] - 4) < 0.5
    out, err = bad.communicate(timeout=150)
    assert bad.returncode == 1, (out, err)
    assert "processing failed" in err
    bad_id = re.search(r"videoId (vid_\w+)", err)
    assert bad_id, err
    failed = requests.get(f"{s.control}/v1/videos/{bad_id.group(1)}", timeout=10).json()
    assert failed["state"] == "FAILED" and failed["failureReason"], failed
    assert "Traceback" not in failed["failureReason"]

    # READY came with the quick first version; wait for the full ladder and its thumbnails
    deadline = time.monotonic() + 120
    while not (v["progress"] == 100 and v["version"] == 2 and v["thumbnails"]):
        assert time.monotonic() < deadline, v
        time.sleep(0.3)
        v = requests.get(f"{s.control}/v1/videos/{up['videoId']}", timeout=10).json()
    assert v["state"] == "READY" and len(v["renditions"]) == 2
    pb = requests.get(f"{s.control}/v1/videos/{up['videoId']}/playback", timeout=10)
    assert pb.status_code == 200, pb.text
    play = pb.json()
    assert play["manifestUrl"].split("/")[6] == "2"  # the newest version
    vtt = requests.get(play["thumbnailsVttUrl"], timeout=10)
    assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT"), vtt.text
    sheet = next(ln for ln in vtt.text.splitlines() if "#xywh=" in ln).split("#", 1)[0]
    sprite = requests.get(play["thumbnailsVttUrl"].rsplit("/", 1)[0] + "/" + sheet, timeout=10)
    assert sprite.status_code == 200 and sprite.content[:2] == b"\xff\xd8"  # JPEG
    assert play["manifestUrl"].startswith(s.edge + f"/v/{up['videoId']}/")
    assert abs(_play(ffmpeg, play["manifestUrl"]) - 4) <= 0.5
    assert abs(_play(ffmpeg, play["dashUrl"]) - 4) <= 0.5
    poster = requests.get(play["thumbnailUrl"], timeout=10)
    assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"

    # Pick the first segment of the first rendition from the HLS playlists.
    base = play["manifestUrl"].rsplit("/", 1)[0]
    master = requests.get(play["manifestUrl"], timeout=10).text
    media_name = next(ln for ln in master.splitlines() if ln and not ln.startswith("#"))
    media = requests.get(f"{base}/{media_name}", timeout=10).text
    seg = next(ln for ln in media.splitlines() if ln and not ln.startswith("#"))
    seg_url = f"{base}/{seg}"
    origin_path = f"/v/{up['videoId']}/{v['version']}/{seg}"

    first = requests.get(seg_url, timeout=10)
    second = requests.get(seg_url, timeout=10)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content and len(first.content) > 0
    assert second.headers["X-Cache"].startswith("edge=HIT"), second.headers
    assert _origin_hits(s, origin_path) == 1

    # A segment nobody has fetched yet, asked for by 20 players at once: one origin fetch.
    media_names = [ln for ln in master.splitlines() if ln and not ln.startswith("#")]
    last_media = requests.get(f"{base}/{media_names[-1]}", timeout=10).text
    cold = [ln for ln in last_media.splitlines() if ln and not ln.startswith("#")][-1]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        bodies = list(pool.map(lambda _: requests.get(f"{base}/{cold}", timeout=30), range(20)))
    assert all(b.status_code == 200 and b.content == bodies[0].content for b in bodies)
    assert _origin_hits(s, f"/v/{up['videoId']}/{v['version']}/{cold}") == 1

    # Ranges through the edge.
    r = requests.get(seg_url, headers={"Range": "bytes=0-99"}, timeout=10)
    assert r.status_code == 206 and r.content == first.content[:100]

    # Bad tokens → 403 JSON, never the bytes.
    token = play["manifestUrl"].split("/")[5]
    vid = up["videoId"]
    for bad_url in (
        seg_url.replace(token, token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")),
        seg_url.replace(token, "not-a-token"),
        seg_url.replace(token, token.split(".")[0] + ".e30." + token.split(".")[2]),
        seg_url.replace(f"/v/{vid}/", "/v/vid_aaaaaaaaaaaaaaaa/"),
    ):
        r = requests.get(bad_url, timeout=10)
        assert r.status_code == 403, (bad_url, r.status_code, r.text)
        assert r.json()["error"]["code"] == "bad_token"

    # Traversal attempts on every tier: refused, never a file from outside the store.
    for url in (
        f"{base}/..%2f..%2f..%2fvod.db",
        f"{base}/%2e%2e/%2e%2e/%2e%2e/vod.db",
        f"{base}/seg%00.m4s",
        f"{s.origin}/v/{vid}/%2e%2e/%2e%2e/%2e%2e/vod.db",
        f"{s.origin}/v/{vid}/..%2F..%2Fsource/{vid}/original",
    ):
        r = requests.get(url, timeout=10)
        # `vod up` gives its tiers a tier secret: the origin refuses strangers first (403)
        assert r.status_code in (400, 403, 404), (url, r.status_code)
        assert r.headers["Content-Type"].startswith("application/json"), url
        assert b"SQLite format" not in r.content

    # Shields and origins answer only their own tiers (issue 11): a player who finds them
    # gets a 403, even for an object the shield holds.
    for tier_url in (s.origin, s.shield):
        r = requests.get(tier_url + origin_path, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", tier_url

    # The tiers `vod up` started authenticate to control with the credential it provisioned:
    # a purge reaches the edge, the shield and the origin and completes.
    operator = subprocess.run(
        [sys.executable, "-m", "vodcore.cli", "keys", "create", "--data", str(s.data),
         "--role", "operator"], check=True, capture_output=True, text=True, timeout=60,
        env=s.env,
    ).stdout.strip()  # fmt: skip
    r = requests.post(f"{s.control}/v1/purges", json={"videoId": vid}, timeout=10,
                      headers={"Authorization": f"Bearer {operator}"})  # fmt: skip
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while True:
        doc = requests.get(f"{s.control}/v1/purges/{r.json()['purgeId']}", timeout=10,
                           headers={"Authorization": f"Bearer {operator}"}).json()  # fmt: skip
        if doc["complete"] and {n["tier"] for n in doc["nodes"]} == {"edge", "shield", "origin"}:
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.2)
    assert (s.data / "node-credential").stat().st_mode & 0o077 == 0  # the owner's only

    # Unknown video → 404; playback before READY → 409 with the state.
    assert requests.get(f"{s.control}/v1/videos/vid_aaaaaaaaaaaaaaaa/playback",
                        timeout=10).status_code == 404  # fmt: skip
    pending = _create(s, "pending", 1000)
    r = requests.get(f"{s.control}/v1/videos/{pending['videoId']}/playback", timeout=10)
    assert r.status_code == 409 and r.json()["error"]["state"] == "UPLOADING"


def test_vod_up_stops_cleanly(stack: Stack) -> None:
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(timeout=30) == 0
    for url in (stack.control, stack.edge, stack.origin):
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/healthz", timeout=2)
