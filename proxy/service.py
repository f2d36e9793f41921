"""Builds the domain from the configuration: the tiers behind one Composite, uploads, the
replication queue, tickets, access rules and jobs. Nothing here knows about HTTP."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass

from proxy.access import Access
from proxy.bulk import BucketBulkData, SelfBulkData
from proxy.config import Config
from proxy.replication import ReplicationQueue
from proxy.store.composite import Composite
from proxy.store.negative import NegativeCache, UploadClock
from proxy.tickets import Signer, load_secret
from proxy.tier import Tier
from proxy.tiers import DiskTier, FsTier, GcsTier, S3Tier, build_tier
from proxy.uploads import Uploader

if typing.TYPE_CHECKING:
    from proxy.jobs import Jobs


@dataclass
class Service:
    config: Config
    store: Composite
    uploader: Uploader
    queue: ReplicationQueue
    signer: Signer
    access: Access
    bulk: BucketBulkData | SelfBulkData
    jobs: Jobs

    async def start(self) -> None:
        await self.store.start()
        await self.queue.start()
        await self.jobs.start()

    async def close(self) -> None:
        await self.jobs.close()
        await self.queue.close()
        await self.store.wait_idle()
        await self.store.close()


def build_store(config: Config) -> Composite:
    tiers = [build_tier(tier, config.source) for tier in config.tiers]
    disks = [tier for tier in tiers if isinstance(tier, DiskTier)]
    # Workers (and imports) sharing the cache folder share its upload clock: see UploadClock.
    clock = UploadClock(os.path.join(disks[0].path, "uploads.clock")) if disks else None
    return Composite(
        tiers,
        negative_cache=NegativeCache(config.negative_cache.url, config.negative_cache.ttl, clock),
        spool_memory=config.server.spool_memory,
        breaker_threshold=config.breaker.threshold,
        breaker_cooldown=config.breaker.cooldown,
    )


def state_dir(store: Composite) -> str:
    """Where generated state lives: the first disk cache's folder (private, 0700), else ./data."""
    for tier in store.tiers:
        if isinstance(tier, DiskTier):
            return tier.path
    return os.path.abspath("./data")


def default_targets(store: Composite) -> list[Tier]:
    """With no uploads.targets, uploads go to the first source that can store blobs."""
    writable = (DiskTier, FsTier, S3Tier, GcsTier)
    found: list[Tier] = [tier for tier in store.tiers if tier.role == "source" and isinstance(tier, writable)]
    return found[:1]


def build_service(config: Config, store: Composite | None = None) -> Service:
    store = store if store is not None else build_store(config)
    targets = [store.tier(name) for name in config.uploads.targets] or default_targets(store)
    state = state_dir(store)
    queue_path = config.uploads.queue_path or os.path.join(state, "queue")
    queue = ReplicationQueue(queue_path, {tier.name: tier for tier in targets[1:]})
    signer = Signer(load_secret(config.auth.ticket_secret, state), config.server.base_url, config.auth.ticket_ttl)
    max_size = config.server.max_upload_size
    uploader = Uploader(store, targets, queue, max_size, store.spool_dir)
    bulk_tier = store.tier(config.uploads.bulk_data_tier) if config.uploads.bulk_data_tier else None
    bulk: BucketBulkData | SelfBulkData = (
        BucketBulkData(bulk_tier, max_size, config.auth.ticket_ttl)
        if isinstance(bulk_tier, S3Tier)
        else SelfBulkData(signer, os.path.join(state, "bulk-data"), max_size)
    )
    from proxy.jobs import Jobs  # here: proxy.transfer, below jobs, uses this module's helpers
    from proxy.transfer import default_into

    jobs = Jobs(store, os.path.join(state, "jobs"), default_into(config, store))
    return Service(config, store, uploader, queue, signer, Access(config, signer), bulk, jobs)
