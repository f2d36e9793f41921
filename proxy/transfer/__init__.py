"""Export and import: moving blobs between the store and a bucket, a folder or a tar archive,
resumably. The engine knows nothing of HTTP: the command line and the server's jobs both run a
TransferSpec through a Transfer and read its Snapshot."""

from __future__ import annotations

from proxy.transfer.engine import Transfer, default_into
from proxy.transfer.spec import TransferError, TransferSpec, UsageError
from proxy.transfer.tally import Snapshot

__all__ = ["Snapshot", "Transfer", "TransferError", "TransferSpec", "UsageError", "default_into"]
