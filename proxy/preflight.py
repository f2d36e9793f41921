"""Every check ``serve`` runs before it binds, so that ``check-config`` accepting a config means
it starts: the host resolves, anonymous uploads are not opened to the network by accident, and
every tier folder is usable. Each failure is a ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
from urllib.parse import urlsplit

from proxy.authorization import check_exposure
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.tiers.kinds import HttpConfig, TierConfig


def preflight(config: Config) -> None:
    _check_host(config)  # first: a host that does not resolve is not "reachable from other machines"
    check_exposure(config)
    targets = config.uploads.targets
    for index, tier in enumerate(config.tiers):
        _check_credentials(tier, f"tiers[{index}] ({tier.name})", config.source)
        for key in dataclasses.fields(tier):
            if key.metadata.get("folder"):
                # a folder written to: a cache, an upload target, or a source that may become one
                writes = tier.role == "cache" or tier.name in targets or not targets
                where = f"tiers[{index}] ({tier.name}).{key.name}"
                _check_folder(getattr(tier, key.name), where, config.source, writes, private=_private(tier))


def _check_credentials(tier: TierConfig, where: str, source: str) -> None:
    # An http tier cannot send both: aiohttp refuses user:password in the URL next to an
    # Authorization header, on every request (each miss was a 500).
    if isinstance(tier, HttpConfig) and tier.token and urlsplit(tier.url).username is not None:
        raise ConfigError(f"{where}.token: the url already carries a user:password; use one or the other (in {source})")


def _private(tier: TierConfig) -> bool:
    return tier.kind == "disk"  # its database is trusted: nobody else may write there


def _check_host(config: Config) -> None:
    host = config.server.host
    try:
        socket.getaddrinfo(host, config.server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConfigError(f"server.host: cannot bind {host!r}: {reason} (in {config.source})") from None


def _check_folder(path: str, where: str, source: str, writes: bool, private: bool) -> None:
    def fail(message: str) -> None:
        raise ConfigError(f"{where}: {message} (in {source})")

    path = os.path.abspath(path)
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            fail(f"cannot create {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            fail(f"cannot create {path}: {parent} is not writable by this user")
        return
    if not os.path.isdir(path):
        fail(f"{path} is a file, not a folder")
    info = os.stat(path)
    if private and info.st_uid != os.getuid():
        fail(f"{path} belongs to another user (uid {info.st_uid}); the cache folder must be this user's own")
    if private and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        fail(f"{path} is writable by others; the cache folder must be private (chmod 700)")
    if not os.access(path, os.R_OK | os.X_OK):
        fail(f"{path} is not readable by this user")
    if writes and not os.access(path, os.W_OK):
        fail(f"{path} is not writable by this user")
