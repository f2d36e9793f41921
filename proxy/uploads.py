"""Verified writes: a body is hashed while it is spooled, checked against its name, stored in the
first upload target before the answer, and queued durably for the other targets."""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proxy import metrics
from proxy.digest import Algorithm, Digest
from proxy.errors import CorruptBlob, DigestMismatch, Forbidden, InsufficientStorage, TierError, UpstreamFailed
from proxy.replication import ReplicationQueue
from proxy.store.composite import Composite
from proxy.store.spool import Room, Spool, SpoolUnwritable
from proxy.tier import Tier

log = logging.getLogger(__name__)
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}


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
        room: Room | None = None,
    ) -> None:
        self.store = store
        self.targets = targets
        self.queue = queue
        self.max_size = max_size
        self.spool_dir = spool_dir
        self.room = room  # a body larger than memory is spooled there; the disk cache evicts for it

    async def receive(
        self, chunks: AsyncIterator[bytes], digest: Digest | None = None, algorithm: Algorithm = "sha1"
    ) -> Stored:
        """Store a body; with ``digest`` it must hash to it (else DigestMismatch, nothing stored)."""
        if not self.targets:
            raise Forbidden("uploads are disabled: no tier can store them (set uploads.targets)")
        spool = Spool(
            digest,
            self.spool_dir,
            max_size=self.max_size,
            algorithm=digest.algorithm if digest else algorithm,
            room=self.room,
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
        except SpoolUnwritable as error:
            raise InsufficientStorage(f"the upload cannot be received here now: {error}") from None
        finally:
            spool.release()

    async def _store(self, digest: Digest, spool: Spool) -> Stored:
        first, rest = self.targets[0], self.targets[1:]
        try:
            created = await first.stat(digest) is None
            await self.store.put(digest, spool, [first] if created else [])  # also forgets "absent"
        except (TierError, OSError) as error:
            if _out_of_space(error):
                raise InsufficientStorage(f"could not store {digest} in {first.name}: {error}") from error
            raise UpstreamFailed(f"could not store {digest} in {first.name}: {error}") from error
        if rest and self.queue is not None:
            try:
                await self.queue.enqueue(digest, spool, [tier.name for tier in rest])
            except Exception as error:  # noqa: BLE001 - the blob is stored: the upload succeeded
                metrics.UPLOADS.labels("unqueued").inc()
                names = ", ".join(tier.name for tier in rest)
                log.error("%s is stored in %s but could not be queued for %s: %r", digest, first.name, names, error)
        metrics.UPLOADS.labels("stored" if created else "existed").inc()
        return Stored(digest, spool.size, created)


def _out_of_space(error: BaseException | None) -> bool:
    """Whether a write failed for want of space (the OSError may be a TierError's cause)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
            return True
        if isinstance(error, sqlite3.OperationalError) and "full" in str(error):
            return True
        error = error.__cause__
    return False
