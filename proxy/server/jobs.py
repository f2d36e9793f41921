"""``/jobs``: export and import jobs run by the server (admin token). The HTTP side only reads the
request and answers; proxy.jobs records and runs the jobs."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BadRequest
from proxy.jobs import Wanted
from proxy.server.bodies import read_json_object
from proxy.server.keys import SERVICE

_ACTIONS: dict[str, Wanted] = {"pause": "pause", "resume": "run", "cancel": "cancel"}


async def create_job(request: web.Request) -> web.Response:
    """POST /jobs {"kind": "export"|"import", ...the fields of `casproxy export/import`} -> 202;
    400 for a spec that cannot run, 403 for a location outside ``jobs.allow``."""
    service = request.app[SERVICE]
    service.access.check_admin(request.headers.get("Authorization"))
    body = await read_json_object(request, '{"kind": "export", ...}')
    job = await service.jobs.create(body)
    return web.json_response(job, status=202, headers={"Location": f"/jobs/{job['id']}"})


async def list_jobs(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.access.check_admin(request.headers.get("Authorization"))
    return web.json_response({"jobs": await service.jobs.all()})


async def get_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.access.check_admin(request.headers.get("Authorization"))
    return web.json_response(await service.jobs.get(request.match_info["id"]))


async def change_job(request: web.Request) -> web.Response:
    """POST /jobs/{id}/pause|resume|cancel: recorded at once, carried out within half a second.
    ``resume`` with {"targets": [...]} runs only those targets of an export again (one that
    failed, say), leaving the others as they are."""
    service = request.app[SERVICE]
    service.access.check_admin(request.headers.get("Authorization"))
    wanted = _ACTIONS[request.match_info["action"]]
    targets: list[str] | None = None
    if request.can_read_body:
        body = await read_json_object(request, '{"targets": ["s3://bucket/prefix/"]}')
        if set(body) - {"targets"}:
            raise BadRequest('want no body, or {"targets": ["s3://bucket/prefix/", ...]} to resume only those')
        listed = body.get("targets")
        if not isinstance(listed, list) or not all(isinstance(target, str) for target in listed):
            raise BadRequest("targets: want a list of this job's targets")
        targets = [str(target) for target in listed]
    return web.json_response(await service.jobs.want(request.match_info["id"], wanted, targets), status=202)
