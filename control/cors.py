"""CORS (https://fetch.spec.whatwg.org/#http-cors-protocol) for the control API, so browser
uploaders (Uppy, tus-js-client in a page) and players served from another origin can call /v1.

Off unless `cors_origins` is set: without it nothing here is installed and no response carries
a CORS header. Hand-written (small) rather than aiohttp-cors, which is unmaintained and wants
every route registered with it.

Rules (only for paths under /v1):
- an origin is allowed when `cors_origins` names it or holds `*`. Configured origins are checked
  at start-up (`scheme://host[:port]`, nothing after; a trailing `/` and a default port are
  dropped, letters lowercased, as browsers serialize an origin); `null` (sandboxed and file://
  pages) is refused: it is no one origin;
- a preflight is an OPTIONS with both `Origin` and `Access-Control-Request-Method`. It is
  answered here, before routing, rate limits and authentication: 204 with the origin echoed in
  `Access-Control-Allow-Origin`, `Vary: Origin`, the methods (`ALLOW_METHODS`), the request
  headers (`ALLOW_HEADERS`: Authorization, Content-Type and tus's) and `Access-Control-Max-Age`;
  for an origin not allowed it is a 403 JSON error without CORS headers;
- an OPTIONS without `Access-Control-Request-Method` is not a preflight: tus discovery (§6) goes
  on to its handler exactly as before;
- every other /v1 response, errors included (4xx JSON, 409, 429, 460, 500), gets `Vary: Origin`,
  and for an allowed origin `Access-Control-Allow-Origin` (the origin echoed) and
  `Access-Control-Expose-Headers` (`EXPOSE_HEADERS`: tus-js-client reads `Location` and
  `Upload-Offset`). They are added in `on_response_prepare`, just before the headers are sent,
  so responses built by the error middleware and streamed ones get them too;
- credentials are never allowed (no `Access-Control-Allow-Credentials`): API keys travel in the
  `Authorization` header, which a request without credentials may carry once the preflight
  lists it; control sets no cookies.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import hdrs, web

from vodcore.errors import FORBIDDEN, ApiError, error_middleware, error_response

ALLOW_METHODS = ("GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS")
ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "Tus-Resumable",
    "Upload-Length",
    "Upload-Offset",
    "Upload-Metadata",
    "Upload-Checksum",
    "Upload-Defer-Length",
    "Upload-Concat",
    "X-HTTP-Method-Override",
    "X-Requested-With",
)
EXPOSE_HEADERS = (
    "Upload-Offset",
    "Upload-Length",
    "Location",
    "Tus-Version",
    "Tus-Resumable",
    "Tus-Max-Size",
    "Tus-Extension",
    "Tus-Checksum-Algorithm",
    "Upload-Expires",
    "Upload-Metadata",
    "Retry-After",
    "ETag",
    "X-Video-Id",  # the video a tus creation POST made
)
MAX_AGE = 7200  # seconds: Chromium's cap (Firefox allows a day)
PREFIX = "/v1"

_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^/?#@\s:\[\]]+)(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def normalize_origin(value: str) -> str:
    """A configured origin as a browser would send it; ValueError if it is not one."""
    v = value.strip().lower()
    if v == "*":
        return v
    if v.endswith("/"):
        v = v[:-1]
    m = _ORIGIN.fullmatch(v)
    if v == "null" or m is None:
        raise ValueError(f"cors_origins: {value!r} is not an origin (scheme://host[:port], or '*')")
    scheme, host, port = m.groups()
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _is_api(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def is_preflight(request: web.BaseRequest) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )


def _add_vary_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get(hdrs.VARY)
    if not vary:
        response.headers[hdrs.VARY] = "Origin"
        return
    tokens = {t.strip().lower() for t in vary.split(",")}
    if "origin" not in tokens and "*" not in tokens:
        response.headers[hdrs.VARY] = f"{vary}, Origin"


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        normalized = {normalize_origin(o) for o in origins if o.strip()}
        self.any = "*" in normalized
        self.origins = frozenset(normalized - {"*"})

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.origins)

    def allowed(self, origin: str | None) -> bool:
        if not origin:
            return False
        return self.any or origin.lower() in self.origins

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers[hdrs.ORIGIN]
        if not self.allowed(origin):
            return error_response(ApiError(FORBIDDEN, "this origin is not allowed (cors_origins)"))
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.VARY: "Origin",
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(ALLOW_METHODS),
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(ALLOW_HEADERS),
                hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE),
            },
        )

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if is_preflight(request) and _is_api(request.path):
                return self.preflight(request)
            return await handler(request)

        return cors_preflight

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if not _is_api(request.path) or is_preflight(request):
            return
        _add_vary_origin(response)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and self.allowed(origin):
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(EXPOSE_HEADERS)

    def install(self, app: web.Application) -> None:
        """Answer preflights (inside the metrics middleware, outside the error and rate-limit
        ones) and add CORS headers to every /v1 response. Nothing when no origin is set."""
        if not self.enabled:
            return
        mws = list(app.middlewares)
        at = mws.index(error_middleware) if error_middleware in mws else 0
        app.middlewares.insert(at, self.middleware())
        app.on_response_prepare.append(self.on_response_prepare)


def install(app: web.Application, origins: Iterable[str]) -> Cors:
    cors = Cors(origins)
    cors.install(app)
    return cors
