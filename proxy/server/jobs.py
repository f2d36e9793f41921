"""``/jobs``: export and import jobs run by the server (admin token). The HTTP side only reads the
request and answers; proxy.jobs records and runs the jobs."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.errors import BadRequest
from proxy.jobs import Wanted
from proxy.server.keys import SERVICE

_ACTIONS: dict[str, Wanted] = {"pause": "pause", "resume": "run", "cancel": "cancel"}


async def create_job(request: web.Request) -> web.Response:
    """POST /jobs {"kind": "export"|"import", ...the fields of `casproxy export/import`} -> 202;
    400 for a spec that cannot run, 403 for a location outside ``jobs.allow``."""
    service = request.app[SERVICE]
    service.access.check_admin(request.headers.get("Authorization"))
    job = await service.jobs.create(await _json(request))
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
    targets = None
    if request.can_read_body:
        body = await _json(request)
        if not isinstance(body, dict) or set(body) - {"targets"}:
            raise BadRequest('want no body, or {"targets": ["s3://bucket/prefix/", ...]} to resume only those')
        targets = body.get("targets")
        if not isinstance(targets, list) or not all(isinstance(target, str) for target in targets):
            raise BadRequest("targets: want a list of this job's targets")
    return web.json_response(await service.jobs.want(request.match_info["id"], wanted, targets), status=202)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON object") from None
