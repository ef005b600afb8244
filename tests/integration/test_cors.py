"""CORS on the control API (control/cors.py), against the real control app on loopback sockets.

- off by default: no CORS header anywhere, a preflight is handled as before (tus discovery);
- a preflight (OPTIONS + Origin + Access-Control-Request-Method) on any /v1 path is 204 with
  the origin echoed, `Vary: Origin`, the methods, every tus request header and a max age; a
  disallowed origin gets a 403 JSON error and no CORS header; preflights are not rate limited;
- actual responses, errors included (401, 404, 409, 412, 429, 460), carry the origin, `Vary:
  Origin` and the exposed headers; never `Access-Control-Allow-Credentials`;
- tus discovery (OPTIONS without Access-Control-Request-Method) is unchanged;
- settings: TOML list or string, VOD_CORS_ORIGINS, a bad origin refused at start-up;
- a real browser: headless Debian Chromium (playwright-core from tests/js, no browser download)
  loads a page from one loopback origin that uploads a Blob with tus-js-client's browser build
  to control on another, in chunks, then reads the JSON API; the stored source's sha256 must be
  the payload's. A page from an origin not in `cors_origins` is refused by the browser and
  creates nothing. Chromium comes from `scripts/bootstrap.sh dev`; without it the test fails.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from control.app import make_app
from control.cors import ALLOW_HEADERS, ALLOW_METHODS, EXPOSE_HEADERS
from tests.integration.test_tus import OCTETS, TUS, LiveControl, digest, stored_source
from tests.nodejs import JS_DIR, node_with_packages
from vodcore.config import Settings, load
from vodcore.db.schema import videos

PAGE = "http://pages.example"  # an allowed origin (browsers send it; requests sends it here)
OTHER = "http://elsewhere.example"
CORS_HEADERS = ("access-control-allow-origin", "access-control-expose-headers")
CHROMIUM = os.environ.get("VOD_TEST_CHROMIUM", "/usr/bin/chromium")
BROWSER_TIMEOUT = 90


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveControl]:
    lc = LiveControl(tmp_path_factory.mktemp("cors") / "var", cors_origins=(PAGE + "/",))
    try:
        yield lc
    finally:
        lc.close()


def preflight(url: str, origin: str, method: str = "PATCH", **headers: str) -> requests.Response:
    h = {"Origin": origin, "Access-Control-Request-Method": method, **headers}
    return requests.options(url, headers=h, timeout=10)


def split(value: str) -> set[str]:
    return {v.strip().lower() for v in value.split(",") if v.strip()}


def assert_cors(r: requests.Response, origin: str = PAGE) -> None:
    assert r.headers.get("Access-Control-Allow-Origin") == origin, dict(r.headers)
    assert "origin" in split(r.headers.get("Vary", ""))
    assert split(r.headers["Access-Control-Expose-Headers"]) == {h.lower() for h in EXPOSE_HEADERS}
    assert "Access-Control-Allow-Credentials" not in r.headers


def assert_no_cors(r: requests.Response) -> None:
    assert not [k for k in r.headers if k.lower().startswith("access-control-")], dict(r.headers)


# --- preflight ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/tus/", "/v1/tus/us_aaaaaaaaaaaaaaaa", "/v1/uploads", "/v1/videos/vid_x", "/v1/nothing"],
)
def test_preflight_allowed(live: LiveControl, path: str) -> None:
    asked = "authorization,content-type,tus-resumable,upload-length,upload-metadata"
    r = preflight(live.url + path, PAGE, "POST", **{"Access-Control-Request-Headers": asked})
    assert r.status_code == 204, r.text
    assert r.headers["Access-Control-Allow-Origin"] == PAGE
    assert "origin" in split(r.headers["Vary"])
    assert split(r.headers["Access-Control-Allow-Methods"]) == {m.lower() for m in ALLOW_METHODS}
    allowed = split(r.headers["Access-Control-Allow-Headers"])
    assert allowed == {h.lower() for h in ALLOW_HEADERS}
    assert split(asked) <= allowed
    assert {
        "tus-resumable", "upload-length", "upload-offset", "upload-metadata", "upload-checksum",
        "upload-defer-length", "upload-concat", "x-http-method-override", "x-requested-with",
    } <= allowed  # fmt: skip
    assert int(r.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in r.headers
    assert "Tus-Version" not in r.headers  # a preflight is not tus discovery
    assert r.content == b""


def test_preflight_from_a_disallowed_origin_is_refused(live: LiveControl) -> None:
    for origin in (OTHER, "null", "http://pages.example:8080", "https://pages.example"):
        r = preflight(f"{live.url}/v1/tus/", origin, "POST")
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "forbidden"
        assert_no_cors(r)


def test_preflight_outside_v1_is_not_answered(live: LiveControl) -> None:
    r = preflight(f"{live.url}/healthz", PAGE, "GET")
    assert r.status_code == 405  # what it always was: /healthz has no OPTIONS
    assert_no_cors(r)


def test_preflights_are_not_rate_limited(tmp_path: Path) -> None:
    lc = LiveControl(
        tmp_path / "var",
        cors_origins=(PAGE,),
        rate_limit_ip_per_second=0.001,
        rate_limit_ip_burst=1,
    )
    try:
        ok = requests.get(
            f"{lc.url}/v1/videos/vid_aaaaaaaaaaaaaaaa", headers={"Origin": PAGE}, timeout=10
        )
        assert ok.status_code == 404  # the one token
        limited = requests.get(f"{lc.url}/v1/search?q=cat", headers={"Origin": PAGE}, timeout=10)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert_cors(limited)  # so a page can read Retry-After
        for _ in range(3):
            assert preflight(f"{lc.url}/v1/tus/", PAGE, "POST").status_code == 204
    finally:
        lc.close()


# --- actual responses --------------------------------------------------------------------------


def test_tus_upload_responses_carry_cors(live: LiveControl) -> None:
    o = {"Origin": PAGE}
    payload = os.urandom(200_000)
    r = requests.post(
        f"{live.url}/v1/tus/",
        headers={**live.auth(), **o, "Upload-Length": str(len(payload)), "Content-Type": OCTETS},
        data=payload[:50_000],
        timeout=10,
    )
    assert r.status_code == 201, r.text
    assert_cors(r)
    url, vid = r.headers["Location"], r.headers["X-Video-Id"]
    assert r.headers["Upload-Offset"] == "50000"

    head = requests.head(url, headers={**live.auth(), **o}, timeout=10)
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "50000"
    assert_cors(head)

    def patch(offset: int, data: bytes, **extra: str) -> requests.Response:
        h = {**live.auth(), **o, "Content-Type": OCTETS, "Upload-Offset": str(offset), **extra}
        return requests.patch(url, headers=h, data=data, timeout=10)

    mismatch = patch(0, payload[:10])
    assert mismatch.status_code == 409 and mismatch.json()["error"]["code"] == "offset_mismatch"
    assert_cors(mismatch)
    bad_sum = patch(50_000, payload[50_000:], **{"Upload-Checksum": digest("sha256", b"x")})
    assert bad_sum.status_code == 460
    assert_cors(bad_sum)
    wrong_version = requests.head(url, headers={**o, "Tus-Resumable": "0.2.2"}, timeout=10)
    assert wrong_version.status_code == 412
    assert_cors(wrong_version)
    done = patch(
        50_000, payload[50_000:], **{"Upload-Checksum": digest("sha256", payload[50_000:])}
    )
    assert done.status_code == 204 and done.headers["Upload-Offset"] == str(len(payload))
    assert_cors(done)
    assert stored_source(live, vid) == payload

    video = requests.get(f"{live.url}/v1/videos/{vid}", headers={**live.auth(), **o}, timeout=10)
    assert video.status_code == 200 and video.json()["state"] == "UPLOADED"
    assert_cors(video)


def test_json_api_and_error_responses_carry_cors(live: LiveControl) -> None:
    o = {"Origin": PAGE}
    body = {"title": "t", "sizeBytes": 10, "contentType": "video/mp4"}
    created = requests.post(
        f"{live.url}/v1/uploads", json=body, headers={**live.auth(), **o}, timeout=10
    )
    assert created.status_code == 201, created.text
    assert_cors(created)
    for r, status in (
        (requests.post(f"{live.url}/v1/uploads", json=body, headers=o, timeout=10), 401),
        (requests.get(f"{live.url}/v1/videos/vid_aaaaaaaaaaaaaaaa", headers=o, timeout=10), 404),
        (requests.get(f"{live.url}/v1/no/such/route", headers=o, timeout=10), 404),
        (requests.put(f"{live.url}/v1/uploads", headers=o, timeout=10), 405),
        (requests.post(f"{live.url}/v1/tus/", headers={**o, **TUS}, timeout=10), 401),
    ):
        assert r.status_code == status, r.text
        assert r.headers["Content-Type"].startswith("application/json")
        assert_cors(r)


def test_a_disallowed_origin_gets_no_cors_headers(live: LiveControl) -> None:
    r = requests.get(
        f"{live.url}/v1/videos/vid_aaaaaaaaaaaaaaaa", headers={"Origin": OTHER}, timeout=10
    )
    assert r.status_code == 404  # answered as ever; the browser keeps it from the page
    assert_no_cors(r)
    assert "origin" in split(r.headers["Vary"])  # a cache must not serve it to PAGE
    plain = requests.get(f"{live.url}/v1/openapi.json", timeout=10)  # no Origin: no CORS
    assert plain.status_code == 200 and "origin" in split(plain.headers["Vary"])
    assert_no_cors(plain)
    outside = requests.get(f"{live.url}/healthz", headers={"Origin": PAGE}, timeout=10)
    assert outside.status_code == 200
    assert_no_cors(outside)


def test_tus_discovery_is_unchanged(live: LiveControl) -> None:
    for path in ("/v1/tus/", "/v1/tus/us_aaaaaaaaaaaaaaaa"):
        plain = requests.options(live.url + path, timeout=10)
        assert plain.status_code == 204
        assert plain.headers["Tus-Version"] == plain.headers["Tus-Resumable"] == "1.0.0"
        assert int(plain.headers["Tus-Max-Size"]) == live.settings.max_upload_bytes
        assert_no_cors(plain)
        # a page's own OPTIONS (after its preflight): discovery, readable across origins
        cross = requests.options(live.url + path, headers={"Origin": PAGE}, timeout=10)
        assert cross.status_code == 204
        assert cross.headers["Tus-Extension"] == plain.headers["Tus-Extension"]
        assert_cors(cross)


def test_wildcard_allows_any_origin(tmp_path: Path) -> None:
    lc = LiveControl(tmp_path / "var", cors_origins=("*",))
    try:
        r = preflight(f"{lc.url}/v1/tus/", OTHER, "POST")
        assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == OTHER
        get = requests.get(f"{lc.url}/v1/search?q=cat", headers={"Origin": OTHER}, timeout=10)
        assert get.status_code == 200
        assert_cors(get, OTHER)
    finally:
        lc.close()


def test_off_by_default(tmp_path: Path) -> None:
    lc = LiveControl(tmp_path / "var")
    try:
        assert lc.settings.cors_origins == ()
        r = preflight(f"{lc.url}/v1/tus/", PAGE, "POST")
        assert r.status_code == 204 and r.headers["Tus-Version"] == "1.0.0"  # tus discovery
        assert_no_cors(r)
        r = preflight(f"{lc.url}/v1/uploads", PAGE, "POST")
        assert r.status_code == 405
        assert_no_cors(r)
        get = requests.get(f"{lc.url}/v1/search?q=cat", headers={"Origin": PAGE}, timeout=10)
        assert get.status_code == 200 and "Vary" not in get.headers
        assert_no_cors(get)
    finally:
        lc.close()


# --- settings ----------------------------------------------------------------------------------


def test_settings_from_toml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VOD_CORS_ORIGINS", raising=False)
    toml = tmp_path / "vod.toml"
    toml.write_text('cors_origins = ["https://a.example", "http://127.0.0.1:5173"]\n')
    assert load(toml).cors_origins == ("https://a.example", "http://127.0.0.1:5173")
    toml.write_text('cors_origins = "https://a.example, https://b.example"\n')
    assert load(toml).cors_origins == ("https://a.example", "https://b.example")
    monkeypatch.setenv("VOD_CORS_ORIGINS", " https://c.example ,*,")
    assert load(toml).cors_origins == ("https://c.example", "*")  # environment wins


@pytest.mark.parametrize("bad", ["null", "https://a.example/app", "a.example", "http://a:b"])
def test_a_bad_origin_stops_start_up(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="cors_origins"):
        make_app(Settings(data_dir=tmp_path / "var", cors_origins=("https://ok.example", bad)))


# --- a real browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_node() -> str:
    """node with tus-js-client and playwright-core installed (`npm ci`), and Chromium."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `scripts/bootstrap.sh dev` installs Debian's chromium",
            pytrace=False,
        )
    return node_with_packages("the browser test")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class StaticSite:
    """A directory served over HTTP on a loopback port of its own (its own origin)."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_Quiet, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def run_browser(node: str, config: dict[str, Any]) -> dict[str, Any]:
    """browser_upload.mjs in its own process group, killed whole if it outlasts the limit."""
    proc = subprocess.Popen(
        [node, str(JS_DIR / "browser_upload.mjs"), json.dumps(config)],
        cwd=JS_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"the browser run did not stop by itself:\n{err}", pytrace=False)
    assert proc.returncode == 0, f"stdout: {out}\nstderr: {err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_browser_uploads_across_origins(browser_node: str, tmp_path: Path) -> None:
    payload = os.urandom(1024 * 1024 + 12345)
    root = tmp_path / "site"
    root.mkdir()
    shutil.copy(JS_DIR / "cors_page.html", root / "index.html")
    shutil.copy(JS_DIR / "node_modules" / "tus-js-client" / "dist" / "tus.min.js", root)
    (root / "payload.bin").write_bytes(payload)
    allowed, refused = StaticSite(root), StaticSite(root)  # two ports: two origins
    lc = LiveControl(tmp_path / "var", cors_origins=(allowed.origin,))
    try:
        report = run_browser(
            browser_node,
            {
                "chromium": CHROMIUM,
                "api": lc.url,
                "key": lc.key,
                "chunkSize": 256 * 1024,
                "timeoutMs": BROWSER_TIMEOUT * 1000,
                "pages": {
                    "allowed": f"{allowed.origin}/index.html",
                    "refused": f"{refused.origin}/index.html",
                },
            },
        )
        ok = report["allowed"]
        assert ok["error"] is None, ok
        assert ok["size"] == len(payload)
        assert ok["videoId"] and ok["url"].startswith(f"{lc.url}/v1/tus/us_")  # Location read
        assert ok["patches"] >= 4  # 1 MiB in 256 KiB chunks, the first on the POST
        assert ok["offsets"][-1] == len(payload)  # Upload-Offset read from every response
        assert ok["video"]["status"] == 200 and ok["video"]["body"]["state"] == "UPLOADED"
        assert ok["missing"]["status"] == 404
        assert ok["missing"]["body"]["error"]["code"] == "not_found"  # an error, readable
        stored = stored_source(lc, ok["videoId"])
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(payload).hexdigest()

        no = report["refused"]
        assert no["error"] and no["videoId"] is None, no  # the browser blocked it
        assert [r["id"] for r in lc.rows(select(videos.c.id))] == [ok["videoId"]]
    finally:
        lc.close()
        allowed.close()
        refused.close()
