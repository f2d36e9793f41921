"""What a transfer says about what went wrong or was done before: each failed item or broken
target is counted in its tally and, for the command line, said on one line as it happens."""

from __future__ import annotations

import logging
from collections.abc import Callable

import botocore.exceptions

from proxy.errors import CorruptBlob, NotFound, ProxyError, TierError
from proxy.transfer.bucket_prefix import error_code
from proxy.transfer.checkpoint import Checkpoint
from proxy.transfer.spec import TransferError
from proxy.transfer.tally import Tally

log = logging.getLogger(__name__)


class Reporter:
    """Where a transfer's lines go (``report``, the command line's; None for a job, whose tally
    alone keeps them). With ``several`` targets each line names the one it is about."""

    def __init__(self, report: Callable[[str], None] | None, several: bool) -> None:
        self._report = report
        self._several = several

    def fail(self, tally: Tally, kind: str, name: str, message: str) -> None:
        """One item failed (``kind``: failed, corrupt or ignored); the run goes on."""
        line = f"{name}: {message}"
        tally.error(kind, line)
        if self._report is not None:
            prefix = f"{tally.location}: " if self._several else ""
            self._report(prefix + line)

    def broke(self, tally: Tally, error: TransferError) -> None:
        """A target broke: its tally says so, and with several targets the others go on."""
        tally.errors.append(f"{tally.location}: {error}")
        tally.error_count += 1
        if self._report is not None and self._several:
            self._report(f"{tally.location}: {error}; the other targets go on")

    def resuming(self, tally: Tally, checkpoint: Checkpoint) -> None:
        """Say at the start of a resumed run how much an earlier run did."""
        if self._report is None or not checkpoint.finished:
            return
        from proxy.transfer.progress import human_size  # progress draws; the engine only counts

        done = len(checkpoint.finished)
        size = sum(size for size, _ in checkpoint.finished.values())
        total = "?" if tally.total is None else str(tally.total)
        where = f" {tally.location}" if self._several else ""
        self._report(f"resuming{where}: {done} of {total} done ({human_size(size)} by earlier runs)")


def describe(error: BaseException) -> str:
    """One line for a failed item."""
    if isinstance(error, ProxyError):
        return error.detail
    if isinstance(error, botocore.exceptions.ClientError):
        message = error.response.get("Error", {}).get("Message", "")
        return f"S3 {error_code(error)}" + (f": {message}" if message else "")
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error) or type(error).__name__


def item_failure(error: Exception) -> tuple[str, str]:
    """How one exported blob's failure is counted and said."""
    if isinstance(error, NotFound):
        return "failed", "found in no tier"
    if isinstance(error, CorruptBlob):
        return "corrupt", f"{error}; not exported"
    log_unexpected(error)
    return "failed", describe(error)


# Failures of the world (a tier, a bucket, a disk); anything else is a bug, logged in full.
_EXPECTED = (
    ProxyError,
    TierError,
    OSError,
    TimeoutError,
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
)


def log_unexpected(error: Exception) -> None:
    if not isinstance(error, _EXPECTED):
        log.error("unexpected error in a transfer", exc_info=error)


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
