"""The aiohttp application: routes, middleware, and the store's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy.config import Config
from proxy.digest import ALGORITHMS, Digest
from proxy.errors import BadDigest
from proxy.server import blobs, bulk, cors, jobs, lfs, ops, uploads
from proxy.server.accesslog import send_request_id
from proxy.server.cors import cors_middleware
from proxy.server.keys import CONFIG, SERVICE, STORE
from proxy.server.metrics import get_metrics, metrics_middleware
from proxy.server.openapi import openapi
from proxy.server.problems import problems_middleware
from proxy.server.protocol import answer_parse_errors
from proxy.server.scrape import metrics_listener
from proxy.server.status import status_page
from proxy.service import build_service
from proxy.store.composite import Composite

BLOB_METHODS = ("GET", "HEAD", "PUT", "DELETE")


async def _not_a_digest(request: web.Request) -> web.StreamResponse:
    """/sha1/../etc, /sha1/a/b: a bad name; a good name with a method its route does not
    serve (TRACE, PATCH, POST...) is 405 with Allow (RFC 9110 15.5.6)."""
    rest = request.match_info["rest"]
    try:
        Digest.parse(rest, blobs.algorithm_of(request))
    except BadDigest:
        raise BadDigest(f"{rest[:80]!r} is not a digest") from None
    raise web.HTTPMethodNotAllowed(request.method, BLOB_METHODS)


async def _only_post(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMethodNotAllowed(request.method, ("POST",))


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi())


def create_app(config: Config, store: Composite | None = None) -> web.Application:
    # cors outside problems: error answers carry CORS headers too, so a page can read them
    app = web.Application(
        middlewares=[metrics_middleware, cors_middleware, problems_middleware], client_max_size=1 << 20
    )
    answer_parse_errors(app)
    cors.install(app, config.cors, config.server.base_url)
    service = build_service(config, store)
    app[CONFIG] = config
    app[SERVICE] = service
    app[STORE] = service.store

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.close()

    app.cleanup_ctx.append(lifetime)
    if config.auth.require_ticket:
        app.on_response_prepare.append(blobs.keep_private)
    app.on_response_prepare.append(send_request_id)
    if config.server.metrics_port:
        app.cleanup_ctx.append(metrics_listener)  # after lifetime: it reports the started service

    async def stopping(app: web.Application) -> None:  # before aiohttp waits for the handlers
        await service.stopping()

    app.on_shutdown.append(stopping)
    router = app.router
    for algorithm in ALGORITHMS:
        # A literal first segment per algorithm keeps these routes in aiohttp's prefix index:
        # a regex there ({algorithm:sha1|sha256}) made every hit scan the route list.
        missing = router.add_resource(f"/{algorithm}/missing")  # before /{hash}, which "missing" is not
        missing.add_route("POST", blobs.post_missing)
        missing.add_route("*", _only_post)
        router.add_post(f"/{algorithm}", uploads.post_blob, expect_handler=uploads.expect_upload)
        blob = router.add_resource(f"/{algorithm}/{{hash}}")
        blob.add_route("GET", blobs.get_blob)  # keep BLOB_METHODS in step with these
        blob.add_route("HEAD", blobs.get_blob)
        blob.add_route("PUT", uploads.put_blob, expect_handler=uploads.expect_upload)
        blob.add_route("DELETE", uploads.delete_blob)
        router.add_route("*", f"/{algorithm}/{{rest:.*}}", _not_a_digest)
    router.add_post("/bulk-data", bulk.create_slots)
    slot = router.add_resource("/bulk-data/{name}")
    slot.add_route("POST", bulk.post_object)
    slot.add_route("PUT", bulk.put_object)
    slot.add_route("GET", bulk.get_object)
    slot.add_route("HEAD", bulk.get_object)
    router.add_post("/lfs/objects/batch", lfs.batch)
    router.add_post("/{repo:.+}/info/lfs/objects/batch", lfs.batch)  # lfs.url derived from a remote's URL
    router.add_post("/jobs", jobs.create_job)
    router.add_get("/jobs", jobs.list_jobs)
    router.add_get("/jobs/{id}", jobs.get_job)
    router.add_post("/jobs/{id}/{action:pause|resume|cancel}", jobs.change_job)
    router.add_get("/healthz", ops.healthz)
    router.add_get("/readyz", ops.readyz)
    router.add_get("/stats", ops.stats)
    router.add_get("/metrics", get_metrics)
    router.add_get("/openapi.json", _openapi)
    router.add_get("/", status_page)
    return app
