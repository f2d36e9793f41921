"""Tickets: signed, expiring URLs that let whoever holds one read a blob (HMAC-SHA256)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from proxy.digest import Digest
from proxy.errors import ConfigError, Forbidden, TicketExpired
from proxy.numbers import decimal

SECRET_FILE = "ticket_secret"
MIN_SECRET = 16  # bytes
_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")  # a hex SHA-256, ASCII only (compare_digest refuses other str)


@dataclass(frozen=True)
class Ticket:
    digest: Digest
    size: int | None  # None when signed offline, without looking the blob up
    url: str
    ticket: str
    expires: int

    def as_json(self) -> dict[str, object]:
        answer: dict[str, object] = {self.digest.algorithm: str(self.digest)}
        if self.size is not None:
            answer["size"] = self.size
        return {**answer, "url": self.url, "ticket": self.ticket, "expires": self.expires}


class Signer:
    """Signs and checks ``path`` + ``expires`` with a secret key."""

    def __init__(self, secret: bytes, base_url: str, ttl: float) -> None:
        if len(secret) < MIN_SECRET:
            # config checks auth.ticket_secret first; this guards library callers
            raise ConfigError(f"auth.ticket_secret: needs at least {MIN_SECRET} bytes, has {len(secret)}")
        self._key = secret
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl

    def signature(self, path: str, expires: int) -> str:
        message = f"{path}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, path: str, ttl: float | None = None, now: float | None = None) -> tuple[str, int]:
        """The query string granting access to ``path``, and its expiry (unix seconds)."""
        expires = int((now or time.time()) + (self.ttl if ttl is None else ttl))
        return urlencode({"expires": expires, "sig": self.signature(path, expires)}), expires

    def ticket(self, digest: Digest, size: int | None, ttl: float | None = None) -> Ticket:
        path = f"/{digest.algorithm}/{digest}"
        query, expires = self.sign(path, ttl)
        url = f"{self.base_url}{path}"
        return Ticket(digest, size, url, f"{url}?{query}", expires)

    def verify(self, path: str, expires: str | None, sig: str | None, now: float | None = None) -> None:
        """Raise Forbidden for a missing, malformed or tampered signature, TicketExpired for an old one."""
        when = decimal(expires)
        if when is None or sig is None or not _SIGNATURE.fullmatch(sig):
            raise Forbidden("a valid ticket (expires and sig) or a bearer token is required")
        # Constant-time: never tell an attacker how much of a guessed signature was right.
        if not hmac.compare_digest(self.signature(path, when), sig.lower()):
            raise Forbidden("the ticket's signature does not match")
        if when < (now or time.time()):
            raise TicketExpired(f"the ticket expired at {expires}")


def load_secret(configured: str, directory: str) -> bytes:
    """The configured secret, or one generated once and kept 0600 in ``directory``.

    Workers starting together may all generate one: each writes its own temporary file and
    links it into place, which fails if a secret is already there, so exactly one wins and
    nobody ever reads a half-written file (nor does a crash leave an empty one)."""
    if configured:
        return configured.encode()
    path = os.path.join(directory, SECRET_FILE)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{SECRET_FILE}.")  # 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_hex(32).encode())
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # another process won: use its secret
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    with open(path, "rb") as file:
        secret = file.read().strip()
    if len(secret) < MIN_SECRET:
        raise ConfigError(
            f"auth.ticket_secret is empty, and {path} holds {len(secret)} bytes, not a generated secret: "
            "delete it to have one generated, or set auth.ticket_secret"
        )
    return secret
