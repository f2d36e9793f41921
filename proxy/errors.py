"""One hierarchy of errors; each carries its HTTP status and RFC 9457 problem ``type``."""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    type = "internal"
    title = "Internal error"

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}


class BadRequest(ProxyError):
    status = 400
    type = "bad-request"
    title = "Bad request"


class BadDigest(BadRequest):
    type = "bad-digest"
    title = "Not a valid digest"


class DigestMismatch(BadRequest):
    type = "digest-mismatch"
    title = "Bytes do not match the digest"


class Unauthorized(ProxyError):
    status = 401
    type = "unauthorized"
    title = "A bearer token is required"


class Forbidden(ProxyError):
    status = 403
    type = "forbidden"
    title = "Forbidden"


class TicketExpired(Forbidden):
    type = "ticket-expired"
    title = "The ticket has expired"


class NotFound(ProxyError):
    status = 404
    type = "not-found"
    title = "Blob not found"


class Conflict(ProxyError):
    status = 409
    type = "conflict"
    title = "Not possible in the current state"


class TooLarge(ProxyError):
    status = 413
    type = "too-large"
    title = "Body too large"


class PreconditionFailed(ProxyError):
    status = 412
    type = "precondition-failed"
    title = "Precondition failed"


class RangeNotSatisfiable(ProxyError):
    status = 416
    type = "range-not-satisfiable"
    title = "Range not satisfiable"


class InsufficientStorage(ProxyError):
    """This machine's storage (cache, spool or queue filesystem) cannot take the bytes now."""

    status = 507
    type = "insufficient-storage"
    title = "Insufficient storage"


class UpstreamFailed(ProxyError):
    """No tier had the blob and at least one tier failed: the answer may change, so retry."""

    status = 502
    type = "upstream-failed"
    title = "An upstream tier failed"

    def __init__(self, detail: str = "", *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class ConfigError(Exception):
    """A bad configuration value; the message names the key and the file."""


class TierError(Exception):
    """A tier failed to answer (timeout, 5xx, auth, connection): the walk goes on."""


class CorruptBlob(TierError):
    """A tier returned bytes that do not hash to the name asked for."""
