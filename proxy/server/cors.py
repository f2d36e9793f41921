"""Browsers (SPEC 5.1): CORS for the blob, upload and bulk-data routes, and the refusal of
state-changing requests that a page on another site sends.

The refusal holds whether or not ``[cors]`` is set: a page can send a "simple" cross-site
request (``fetch(url, {method: "POST", mode: "no-cors"})``) without any preflight, and on a
loopback proxy without upload tokens that request would store its body. Browsers name the
page's origin in ``Origin`` on every such request (and ``Sec-Fetch-Site`` says cross-site), so
a write is let through only when it carries neither, or its origin is this server's own
(``server.public_url``) or one listed in ``allow_origins``. Clients that are not browsers send neither header.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from proxy.config import CorsConfig
from proxy.errors import Forbidden
from proxy.server.problems import problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

READS = frozenset({"GET", "HEAD"})
EXPOSED = "ETag, Content-Length, Content-Range, Content-Encoding, X-Cache, X-Cache-Tier"
ALLOWED_HEADERS = "Authorization, Content-Type, Content-Encoding, Range, If-Match, If-None-Match, If-Range"
# The routes a web app may call: blobs, uploads, /sha1/missing and bulk-data slots.
_BROWSER_ROUTE = re.compile(r"/(sha1|sha256|bulk-data)(/.*)?")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True)
class CorsPolicy:
    origins: frozenset[str]  # allowed to read and write
    any_reader: bool  # "*": any origin may read
    max_age: int
    own: str  # this server's public origin (server.public_url)

    @classmethod
    def from_config(cls, config: CorsConfig, public_url: str) -> CorsPolicy:
        listed = frozenset(_origin(o) for o in config.allow_origins if o != "*")
        return cls(listed, "*" in config.allow_origins, int(config.max_age), _origin(public_url))

    @property
    def enabled(self) -> bool:
        return bool(self.origins) or self.any_reader

    def allows(self, origin: str, method: str) -> bool:
        return origin.lower() in self.origins or (self.any_reader and method in READS)

    def cross_site(self, request: web.BaseRequest) -> bool:
        """Whether the browser that sent this request says a page of another site made it."""
        origin = request.headers.get("Origin")
        if origin is None:
            return request.headers.get("Sec-Fetch-Site", "same-origin") in ("cross-site", "same-site")
        origin = origin.lower()  # "null" (a sandboxed page, a file) is never ours
        # Not the Host header's origin: a DNS-rebinding page on evil.example would pass as that.
        return origin not in self.origins and origin != self.own


CORS = web.AppKey("cors", CorsPolicy)


def _preflight(policy: CorsPolicy, origin: str, method: str) -> web.StreamResponse:
    if not policy.allows(origin, method):
        return problem(403, Forbidden.type, Forbidden.title, f"origin {origin[:100]!r} may not {method[:20]} here")
    methods = "GET, HEAD, PUT, POST, DELETE" if origin.lower() in policy.origins else "GET, HEAD"
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": str(policy.max_age),
        },
    )


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    policy = request.app[CORS]
    if request.method not in READS and request.method != "OPTIONS" and policy.cross_site(request):
        origin = request.headers.get("Origin", "another site")[:100]
        detail = f"a {request.method[:20]} from {origin!r} is refused: add the origin to cors.allow_origins"
        return problem(403, Forbidden.type, Forbidden.title, detail)
    asker = request.headers.get("Origin")
    wanted = request.headers.get("Access-Control-Request-Method")
    if request.method == "OPTIONS" and asker and wanted and _BROWSER_ROUTE.fullmatch(request.path):
        return _preflight(policy, asker, wanted.upper())
    return await handler(request)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the CORS headers of an actual response, errors and streams included."""
    policy = request.app[CORS]
    if not policy.enabled or not _BROWSER_ROUTE.fullmatch(request.path):
        return
    response.headers.add("Vary", "Origin")  # the answer depends on it: a shared cache must key on it
    origin = request.headers.get("Origin")
    method = request.headers.get("Access-Control-Request-Method", request.method).upper()
    if not origin or not policy.allows(origin, method):
        return
    response.headers["Access-Control-Allow-Origin"] = origin if origin.lower() in policy.origins else "*"
    response.headers["Access-Control-Expose-Headers"] = EXPOSED


def install(app: web.Application, config: CorsConfig, public_url: str) -> None:
    app[CORS] = CorsPolicy.from_config(config, public_url)
    app.on_response_prepare.append(cors_headers)
