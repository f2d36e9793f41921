"""Export and import: moving blobs between the store and a bucket, a folder or a tar archive,
resumably. The engine knows nothing of HTTP: the command line and the server's jobs both run a
TransferSpec through a Transfer and read its Snapshot. Names are imported on first use, so the
command line's parser does not load boto3."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.lazy import exports

_EXPORTS = {
    "Snapshot": "proxy.transfer.tally",
    "Transfer": "proxy.transfer.engine",
    "TransferError": "proxy.transfer.spec",
    "TransferSpec": "proxy.transfer.spec",
    "UsageError": "proxy.transfer.spec",
    "default_into": "proxy.transfer.wiring",
}


__getattr__ = exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from proxy.transfer.engine import Transfer
    from proxy.transfer.spec import TransferError, TransferSpec, UsageError
    from proxy.transfer.tally import Snapshot
    from proxy.transfer.wiring import default_into

__all__ = [
    "Snapshot",
    "Transfer",
    "TransferError",
    "TransferSpec",
    "UsageError",
    "default_into",
]
