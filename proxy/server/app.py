"""The aiohttp application: routes, middleware, and the store's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy.composite import Composite
from proxy.config import Config
from proxy.errors import BadDigest
from proxy.server import blobs, ops
from proxy.server.keys import CONFIG, STORE
from proxy.server.openapi import openapi
from proxy.server.problems import problems_middleware
from proxy.store import build_store

_ALGORITHM = "{algorithm:sha1|sha256}"


async def _not_a_digest(request: web.Request) -> web.StreamResponse:
    # /sha1/../etc, /sha1/a/b: anything under a digest route that is not one is a bad name
    raise BadDigest(f"{request.match_info['rest'][:80]!r} is not a digest")


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi())


def create_app(config: Config, store: Composite | None = None) -> web.Application:
    app = web.Application(middlewares=[problems_middleware], client_max_size=1 << 20)
    app[CONFIG] = config
    app[STORE] = store if store is not None else build_store(config)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await app[STORE].start()
        yield
        await app[STORE].close()

    app.cleanup_ctx.append(lifetime)
    router = app.router
    router.add_post(f"/{_ALGORITHM}/missing", blobs.post_missing)
    router.add_get(f"/{_ALGORITHM}/{{hash:[^/]+}}", blobs.get_blob)  # GET also answers HEAD
    router.add_route("*", f"/{_ALGORITHM}/{{rest:.*}}", _not_a_digest)
    router.add_get("/healthz", ops.healthz)
    router.add_get("/readyz", ops.readyz)
    router.add_get("/stats", ops.stats)
    router.add_get("/openapi.json", _openapi)
    return app
