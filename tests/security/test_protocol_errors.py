"""Issue 11, item 9 (malformed-header errors were plain text, not JSON) and item 10 (a client
that disconnects mid-body, `curl … | head -c 1000`, was logged as an unhandled error and
counted as a 500 at the edge), on a real edge and a real control over raw loopback sockets:

- every malformed request head (bad header name or value, NUL, obs-fold, oversized line or
  too many headers, bad request line, method or version, invalid or duplicate Content-Length,
  Content-Length with Transfer-Encoding, TLS on the HTTP port…) is answered with the JSON
  error of the catalogue (400 `bad_header` / `bad_request`, 414, 431), then the connection
  is closed; it is logged as one INFO line, never with a traceback;
- a client that closes (FIN or RST) after 1000 bytes of a large response, on a miss and on
  a hit, or in the middle of its request body, is no error: no 500 in /metrics, no ERROR
  line or traceback in the log.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest

from tests.security.wire import (
    closed_by_server,
    exchange,
    healthz,
    metric_sum,
    metrics,
    open_from,
    serve,
    set_linger0,
)
from vodcore.connlimits import ServerLimits

H = b"GET / HTTP/1.1\r\nHost: t\r\n"
P = b"POST /v1/uploads HTTP/1.1\r\nHost: t\r\n"

# name → (raw request, status, error code)
MALFORMED: dict[str, tuple[bytes, int, str]] = {
    "space in a header name": (H + b"Bad Name: x\r\n\r\n", 400, "bad_header"),
    "space before the colon": (H + b"X : y\r\n\r\n", 400, "bad_header"),
    "control byte in a value": (H + b"X: a\x01b\r\n\r\n", 400, "bad_header"),
    "NUL in a value": (H + b"X: a\x00b\r\n\r\n", 400, "bad_header"),
    "NUL in a name": (H + b"X\x00: ab\r\n\r\n", 400, "bad_header"),
    "obs-fold (RFC 9112 §5.2)": (H + b"X: a\r\n  b\r\n\r\n", 400, "bad_header"),
    "header value over 8 KiB": (H + b"X: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    "header name over 8 KiB": (H + b"a" * 9000 + b": x\r\n\r\n", 431, "headers_too_large"),
    "200 header fields": (
        H + b"".join(b"X%d: y\r\n" % i for i in range(200)) + b"\r\n",
        431,
        "headers_too_large",
    ),
    "request-target over 8 KiB": (
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        414,
        "uri_too_long",
    ),
    "garbage": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "TLS on the HTTP port": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40,
        400,
        "bad_request",
    ),
    "bad method": (b"G@T / HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "bad version": (b"GET / HTTP/9.9\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "spaces in the target": (b"GET /a b c HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "bare LF": (b"GET /healthz HTTP/1.1\nHost: t\n\n", 400, "bad_request"),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_request"),
    "no Host in HTTP/1.1 (RFC 9112 §3.2)": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "bad_header"),
    "Content-Length not a number": (P + b"Content-Length: abc\r\n\r\n", 400, "bad_header"),
    "negative Content-Length": (P + b"Content-Length: -1\r\n\r\n", 400, "bad_header"),
    "Content-Length overflow": (
        P + b"Content-Length: " + b"9" * 30 + b"\r\n\r\n",
        400,
        "bad_header",
    ),
    "two Content-Lengths (RFC 9112 §6.3)": (
        P + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
        "bad_header",
    ),
    "Content-Length and Transfer-Encoding": (
        P + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_header",
    ),
    "Transfer-Encoding not ending in chunked": (
        P + b"Transfer-Encoding: gzip\r\n\r\n",
        400,
        "bad_header",
    ),
}


@pytest.fixture(params=["edge", "control"])
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_malformed_heads_get_a_json_error_and_a_close(
    tier: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serve(tier, tmp_path, ServerLimits()) as live:
        for name, (raw, status, code) in MALFORMED.items():
            caplog.clear()
            reader, writer = await open_from(live.port)
            writer.write(raw)
            got = await closed_by_server(reader, within=10.0)
            writer.close()
            assert got is not None, f"{name}: the connection stayed open"
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == str(status).encode(), (name, got[:200])
            assert b"content-type: application/json" in head.lower(), (name, head)
            err = orjson.loads(body)["error"]
            assert err["code"] == code, (name, err)
            assert set(err) == {"code", "message"}
            lines = [r for r in caplog.records if r.name.startswith(("vod", "aiohttp"))]
            assert not [r for r in lines if r.exc_info or r.levelno > logging.INFO], name
            assert len([r for r in lines if "bad request head" in r.getMessage()]) == 1, name
        assert await healthz(live.port) == 200


def _assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
async def test_a_client_leaving_mid_response_is_no_server_error(
    rst: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serve("edge", tmp_path, ServerLimits()) as live:
        before = await metrics(live.port)
        for _ in range(3):  # a miss, then hits
            reader, writer = await open_from(live.port)
            writer.write(b"GET /v/big/1/seg.m4s HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.wait_for(reader.readexactly(1000), 10)
            if rst:
                set_linger0(writer)
            writer.close()
            await asyncio.sleep(0.2)  # let the server notice before the next
        assert await healthz(live.port) == 200
        after = await metrics(live.port)
        five = metric_sum(after, "vod_http_requests_total", tier="edge", status="500")
        assert five == metric_sum(before, "vod_http_requests_total", tier="edge", status="500")
        _assert_quiet(caplog)


async def test_a_client_leaving_mid_body_is_no_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serve("control", tmp_path, ServerLimits()) as live:
        before = await metrics(live.port)
        for rst in (False, True):
            _, writer = await open_from(live.port)
            writer.write(
                b"POST /v1/uploads HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + live.keys["creator"].encode() + b"\r\n"
                b"Content-Length: 100000\r\n\r\n" + b'{"title": "' + b"x" * 1000
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            if rst:
                set_linger0(writer)
            writer.close()
            await asyncio.sleep(0.2)
        assert await healthz(live.port) == 200
        after = await metrics(live.port)
        five = metric_sum(after, "vod_http_requests_total", tier="control", status="500")
        assert five == metric_sum(before, "vod_http_requests_total", tier="control", status="500")
        _assert_quiet(caplog)


async def test_a_json_error_for_an_unknown_path_still_reads_as_before(tmp_path: Path) -> None:
    """The well-formed path is untouched: a 404 is the catalogue's JSON, keep-alive kept."""
    async with serve("control", tmp_path, ServerLimits()) as live:
        status, headers, body = await exchange(live.port, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"
        assert headers.get("connection") != "close"
