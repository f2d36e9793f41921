"""Verified writes: a body is hashed while it is spooled, checked against its name, stored in the
first upload target before the answer, and queued durably for the other targets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from proxy import metrics
from proxy.digest import Algorithm, Digest
from proxy.errors import CorruptBlob, DigestMismatch, Forbidden, TierError, UpstreamFailed
from proxy.replication import ReplicationQueue
from proxy.store.composite import Composite
from proxy.store.spool import Spool
from proxy.tier import Tier


@dataclass(frozen=True)
class Stored:
    digest: Digest
    size: int
    created: bool  # False: the first target had it already


class Uploader:
    def __init__(
        self,
        store: Composite,
        targets: list[Tier],
        queue: ReplicationQueue | None,
        max_size: int,
        spool_dir: str | None = None,
    ) -> None:
        self.store = store
        self.targets = targets
        self.queue = queue
        self.max_size = max_size
        self.spool_dir = spool_dir

    async def receive(
        self, chunks: AsyncIterator[bytes], digest: Digest | None = None, algorithm: Algorithm = "sha1"
    ) -> Stored:
        """Store a body; with ``digest`` it must hash to it (else DigestMismatch, nothing stored)."""
        if not self.targets:
            raise Forbidden("uploads are disabled: no tier can store them (set uploads.targets)")
        spool = Spool(
            digest, self.spool_dir, max_size=self.max_size, algorithm=digest.algorithm if digest else algorithm
        )
        try:
            async for chunk in chunks:
                await spool.write(chunk)
            try:
                await spool.finish()
            except CorruptBlob as error:
                raise DigestMismatch(str(error)) from None
            assert spool.digest is not None
            return await self._store(spool.digest, spool)
        finally:
            spool.release()

    async def _store(self, digest: Digest, spool: Spool) -> Stored:
        first, rest = self.targets[0], self.targets[1:]
        try:
            created = await first.stat(digest) is None
            await self.store.put(digest, spool, [first] if created else [])  # also forgets "absent"
        except (TierError, OSError) as error:
            raise UpstreamFailed(f"could not store {digest} in {first.name}: {error}") from error
        if rest and self.queue is not None:
            await self.queue.enqueue(digest, spool, [tier.name for tier in rest])
        metrics.UPLOADS.labels("stored" if created else "existed").inc()
        return Stored(digest, spool.size, created)
