"""From a TransferSpec to what it names: the target or source at each location, where each
location's checkpoint lives, and the defaults a run takes from the store and config."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from proxy.blocking import run
from proxy.config import Config
from proxy.policy import default_targets
from proxy.policy import state_dir as policy_state_dir
from proxy.store.composite import Composite
from proxy.tier import Tier
from proxy.transfer.bucket_prefix import BucketSource, BucketTarget, make_client
from proxy.transfer.locations import ByteBudget, FolderSource, FolderTarget, Location, Source, Target
from proxy.transfer.spec import TransferSpec, UsageError
from proxy.transfer.tarball import TarSource, TarTarget


def state_dir(store: Composite) -> str:
    """Where a transfer keeps its checkpoints by default: the folder a tier owns (the disk
    cache's), else ./data."""
    return policy_state_dir(store.tiers)


def default_into(config: Config, store: Composite) -> str | None:
    """The tier an import writes to by default: the first upload target, else the first source
    that can store blobs."""
    if config.uploads.targets:
        return config.uploads.targets[0]
    targets = default_targets(store.tiers)
    return targets[0].name if targets else None


def checkpoint_path(spec: TransferSpec, location: Location, folder: str, into: str | None = None) -> str | None:
    """Where the record of ``spec``'s work at ``location`` lives: ``spec.checkpoint`` for one
    location (one file per target beside it for several), else a file in ``folder`` named by
    the work, so the same location resumes whatever other targets a run names."""
    name = hashlib.sha1(json.dumps(identity(spec, location, into), sort_keys=True).encode()).hexdigest()[:16]
    if spec.checkpoint is not None:
        if len(spec.locations) == 1:
            return spec.checkpoint
        root, ext = os.path.splitext(spec.checkpoint)
        return f"{root}-{name}{ext}"
    if not location.resumable:
        return None
    return os.path.join(folder, "transfers", f"{spec.kind}-{name}.sqlite")


def identity(spec: TransferSpec, location: Location, into: str | None) -> dict[str, Any]:
    """What a checkpoint records work for: a checkpoint of other work is refused, not reused."""
    return {"kind": spec.kind, "location": location.identity, "into": into}


async def make_target(
    location: Location,
    spec: TransferSpec,
    store: Composite,
    executor: ThreadPoolExecutor,
    parts: ByteBudget,
    stdout: BinaryIO | None,
) -> Target:
    """The target at ``location``; bucket targets share ``parts``, the memory for multipart parts."""
    if location.kind == "s3":
        # boto3 reads its service models and ~/.aws files building a client: not on the loop
        client = await run(make_client, location, spec.endpoint_url, store.tiers, spec.jobs * 2 + 4)
        return BucketTarget(
            location,
            client,
            executor,
            requests=spec.jobs,
            part_size=spec.part_size,
            threshold=spec.multipart_threshold,
            budget=parts,
        )
    if location.kind == "folder":
        return FolderTarget(location, executor)
    return TarTarget(location, stdout or sys.stdout.buffer)


async def make_source(
    location: Location, spec: TransferSpec, store: Composite, executor: ThreadPoolExecutor, stdin: BinaryIO | None
) -> Source:
    if location.kind == "s3":
        client = await run(make_client, location, spec.endpoint_url, store.tiers, spec.jobs * 2 + 4)
        return BucketSource(location, client, executor)
    if location.kind == "folder":
        return FolderSource(location, executor)
    return TarSource(location, (stdin or sys.stdin.buffer) if location.kind == "stream" else None)


def into_tier(store: Composite, into: str | None) -> Tier:
    """The tier an import stores in; UsageError if there is none or it cannot store."""
    if not into:
        raise UsageError("no tier to import into: name one with --into (no uploads.targets, no writable source)")
    try:
        tier = store.tier(into)
    except KeyError:
        names = ", ".join(tier.name for tier in store.tiers)
        raise UsageError(f"--into {into}: no such tier (tiers: {names})") from None
    if not tier.can_store:
        raise UsageError(f"--into {into}: a {type(tier).__name__} cannot be written")
    return tier
