"""Who may do what: bearer tokens for uploads and administration, tickets for reads."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping

from proxy.config import Config
from proxy.errors import ConfigError, Forbidden, Unauthorized
from proxy.tickets import Signer


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _known(token: str | None, tokens: tuple[str, ...]) -> bool:
    # Compare against every token, in constant time each, so timing reveals nothing.
    # surrogatepass: a header's undecodable bytes (0xff) arrive as surrogates; they must compare
    # unequal, not raise.
    given = token.encode("utf-8", "surrogatepass") if token is not None else None
    found = False
    for candidate in tokens:
        found |= given is not None and hmac.compare_digest(given, candidate.encode())
    return found


class Access:
    def __init__(self, config: Config, signer: Signer) -> None:
        self.upload_tokens = config.auth.upload_tokens
        self.admin_tokens = config.auth.admin_tokens
        self.require_ticket = config.auth.require_ticket
        self.signer = signer

    def check_upload(self, authorization: str | None) -> None:
        """Anyone may upload when no upload tokens are configured (loopback binds only)."""
        if self.upload_tokens:
            self._check(bearer_token(authorization), self.upload_tokens + self.admin_tokens, "upload")

    def check_token(self, authorization: str | None) -> None:
        """An upload or admin token, whatever else is configured (Git LFS reads under require_ticket)."""
        self._check(bearer_token(authorization), self.upload_tokens + self.admin_tokens, "upload")

    @staticmethod
    def upload_scope(path: str) -> str:
        # Not what a read ticket signs: a read URL can never be used to write.
        return f"upload {path}"

    def signed_upload_url(self, path: str) -> tuple[str, int]:
        """A URL that lets anyone PUT this one name until it expires (Git LFS upload actions):
        the body must still hash to the name, so it grants no more than the right bytes."""
        query, expires = self.signer.sign(self.upload_scope(path))
        return f"{self.signer.base_url}{path}?{query}", expires

    def check_signed_upload(self, path: str, query: Mapping[str, str]) -> None:
        self.signer.verify(self.upload_scope(path), query.get("expires"), query.get("sig"))

    def check_admin(self, authorization: str | None) -> None:
        if not self.admin_tokens:
            raise Forbidden("administration is disabled: no auth.admin_tokens are configured")
        self._check(bearer_token(authorization), self.admin_tokens, "admin")

    def check_read(self, path: str, query: Mapping[str, str], authorization: str | None) -> None:
        """With require_ticket a read needs a ticket or a token. A ticket that comes along is
        checked either way: a tampered or expired one is refused, never silently ignored."""
        if self.require_ticket and self._has_token(authorization):
            return
        if self.require_ticket or "sig" in query or "expires" in query:
            self.signer.verify(path, query.get("expires"), query.get("sig"))

    def check_probe(self, authorization: str | None) -> None:
        """Existence checks (/sha1/missing): under require_ticket they need a token, or anyone
        could learn which blobs exist."""
        if self.require_ticket:
            self._check(bearer_token(authorization), self.upload_tokens + self.admin_tokens, "upload")

    def _has_token(self, authorization: str | None) -> bool:
        token = bearer_token(authorization)
        return token is not None and _known(token, self.upload_tokens + self.admin_tokens)

    @staticmethod
    def _check(token: str | None, tokens: tuple[str, ...], what: str) -> None:
        if token is None:
            raise Unauthorized(
                f"this needs an {what} token: Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"}
            )
        if not _known(token, tokens):
            raise Forbidden(f"the bearer token is not a valid {what} token")


def check_exposure(config: Config) -> None:
    """Refuse to open anonymous uploads to the network by accident."""
    if config.auth.upload_tokens or config.auth.allow_anonymous_uploads:
        return
    host = config.server.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"server.host = {host!r} is reachable from other machines but auth.upload_tokens is empty: "
            f"set upload tokens, or auth.allow_anonymous_uploads = true (in {config.source})"
        )
