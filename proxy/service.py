"""Builds the domain from the configuration: the tiers behind one Composite, uploads, the
replication queue, tickets, access rules and jobs. Nothing here knows about HTTP."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass

from proxy.authorization import Access
from proxy.bulk import BucketBulkData, SelfBulkData
from proxy.config import Config
from proxy.policy import default_targets, state_dir
from proxy.replication import ReplicationQueue
from proxy.store.claims import Claims
from proxy.store.composite import Composite
from proxy.store.negative import NegativeCache, UploadClock
from proxy.tickets import Signer, load_secret
from proxy.tiers.kinds import build_tier
from proxy.uploads import Uploader

if typing.TYPE_CHECKING:
    from proxy.jobs import Jobs


STOP_GRACE = 5.0  # seconds fills in flight get to finish when the server stops


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

    async def stopping(self, grace: float = STOP_GRACE) -> None:
        """The server stops taking requests: fills get ``grace`` seconds, so the requests that
        wait on them end and a stuck one cannot hold the stop."""
        await self.store.settle(grace)

    async def close(self) -> None:
        await self.jobs.close()
        await self.queue.close()
        await self.store.wait_idle()
        await self.store.close()


def build_store(config: Config) -> Composite:
    tiers = [build_tier(tier) for tier in config.tiers]
    # Workers (and imports) sharing the cache folder share its upload clock: see UploadClock.
    states = [tier.state_dir for tier in tiers if tier.state_dir]
    clock = UploadClock(os.path.join(states[0], "uploads.clock")) if states else None
    return Composite(
        tiers,
        negative_cache=NegativeCache(
            config.negative_cache.url, config.negative_cache.ttl, clock, config.negative_cache.max_entries
        ),
        spool_memory=config.server.spool_memory,
        max_blob_size=config.server.max_blob_size,
        breaker_threshold=config.breaker.threshold,
        breaker_cooldown=config.breaker.cooldown,
        corrupt_memory=config.negative_cache.max_entries,
        claims=Claims(config.coalesce.url, config.coalesce.wait) if config.coalesce.url else None,
    )


def build_service(config: Config, store: Composite | None = None) -> Service:
    store = store if store is not None else build_store(config)
    targets = [store.tier(name) for name in config.uploads.targets] or default_targets(store.tiers)
    state = state_dir(store.tiers)
    queue_path = config.uploads.queue_path or os.path.join(state, "queue")
    queue = ReplicationQueue(queue_path, {tier.name: tier for tier in targets[1:]})
    signer = Signer(load_secret(config.auth.ticket_secret, state), config.server.base_url, config.auth.ticket_ttl)
    max_size = config.server.max_upload_size
    uploader = Uploader(store, targets, queue, max_size, store.spool_dir, store.spool_room)
    bulk: BucketBulkData | SelfBulkData = SelfBulkData(signer, os.path.join(state, "bulk-data"), max_size)
    if config.uploads.bulk_data_tier:  # an s3 tier, as the config check made sure
        from proxy.tiers.s3 import S3Tier

        bulk_tier = store.tier(config.uploads.bulk_data_tier)
        assert isinstance(bulk_tier, S3Tier)
        bulk = BucketBulkData(bulk_tier, max_size, config.auth.ticket_ttl)
    from proxy.jobs import Jobs  # here: it imports the transfer engine and boto3
    from proxy.transfer import default_into

    jobs = Jobs(store, os.path.join(state, "jobs"), default_into(config, store), config.jobs.allow)
    return Service(config, store, uploader, queue, signer, Access(config, signer), bulk, jobs)
