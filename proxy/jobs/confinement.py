"""What a job may ask for (SPEC 7): it reads and writes only under ``jobs.allow``, its hashes
come in the request, a bucket is reached with the endpoint and credentials of the configured s3
tier on it, and the server chooses where checkpoints go."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.blocking import run
from proxy.errors import BadRequest, Forbidden
from proxy.store.composite import Composite
from proxy.transfer import UsageError
from proxy.transfer.bucket_prefix import tier_for
from proxy.transfer.locations import Location, parse_location

# What a request may not choose: the server reads no files for it, and talks only to the
# endpoints of its own tiers.
REFUSED = {
    "hashes_file": "give the hashes in the request (hashes: [...]); a job reads no file of the server's",
    "endpoint_url": "a job reaches a bucket through the configured s3 tier on it, never an endpoint of its own",
    "checkpoint": "the server chooses where a job keeps its checkpoints",
}


class Confinement:
    def __init__(self, store: Composite, allow: Sequence[str]) -> None:
        self.store = store
        self.allow = [parse_location(place) for place in allow]

    def check_request(self, request: Any) -> Mapping[str, Any]:
        """The request as a mapping; BadRequest if it is none, or names what a job may not choose."""
        if not isinstance(request, Mapping):
            raise BadRequest('want a JSON object such as {"kind": "export", "targets": [...], "hashes": [...]}')
        for key, why in REFUSED.items():
            if key in request:
                raise BadRequest(f"{key}: not accepted in a job; {why}")
        return request

    async def check_place(self, location: Location) -> None:
        """Forbidden outside ``jobs.allow``; BadRequest for a place no job can use."""
        if location.kind == "stream":
            raise BadRequest("a job cannot use - (standard input or output): give a bucket, folder or .tar file")
        if not await run(self._allowed, location):
            allowed = ", ".join(place.text for place in self.allow) or "nothing (jobs.allow is empty)"
            raise Forbidden(f"{location.text}: outside jobs.allow; a job may use {allowed}")
        if location.kind == "s3" and tier_for(location, self.store.tiers) is None:
            raise BadRequest(f"{location.text}: no configured s3 tier on bucket {location.bucket} to reach it with")

    def check_into(self, name: str | None) -> None:
        """UsageError unless ``name`` is a tier an import can store in."""
        if not name:
            raise UsageError("into: no tier to import into (no uploads.targets, no writable source)")
        try:
            tier = self.store.tier(name)
        except KeyError:
            raise UsageError(f"into: no tier named {name!r}") from None
        if not tier.can_store:
            raise UsageError(f"into: tier {name!r} cannot store blobs")

    def _allowed(self, location: Location) -> bool:
        """Under a place of ``jobs.allow`` (folders compared after symlinks are resolved)."""
        for place in self.allow:
            if location.kind == "s3" and place.kind == "s3":
                if location.bucket == place.bucket and location.prefix.startswith(place.prefix):
                    return True
            elif location.kind != "s3" and place.kind != "s3":
                path, root = os.path.realpath(location.path), os.path.realpath(place.path)
                if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                    return True
        return False
