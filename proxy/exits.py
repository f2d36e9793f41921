"""The one mapping from an error to a command's last words and exit status, for every
``casproxy`` command: a user's mistake is one line on stderr naming the key or flag, never a
traceback. Anything not listed here is a bug, and keeps its traceback."""

from __future__ import annotations

import os
import sys

from proxy.errors import ConfigError, ProxyError, TierError

FAILED = 1  # the work (or part of it) could not be done; running again may finish it
MISTAKE = 2  # the command or the config is wrong; running again will not help
INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT


class CommandFailed(Exception):
    """The command could not do its work: exit 1."""


class UsageError(CommandFailed):
    """A mistake in what was asked for (a flag, an argument): exit 2."""


def report(error: BaseException, prefix: str = "casproxy") -> int:
    """Print ``error`` as one line and return the exit status; raise it again if it is a bug."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, BrokenPipeError):  # `casproxy config | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return FAILED
    if isinstance(error, ConfigError):
        status, message = MISTAKE, f"config error: {error}"
    elif isinstance(error, UsageError):
        status, message = MISTAKE, str(error)
    elif isinstance(error, CommandFailed):
        status, message = FAILED, str(error)
    elif isinstance(error, ProxyError):  # a 4xx: what was asked is wrong; else it failed
        status, message = (MISTAKE if error.status < 500 else FAILED), error.detail
    elif isinstance(error, TierError):  # e.g. cache stats or check against a broken tier
        status, message = FAILED, str(error) or type(error).__name__
    elif isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        status, message = FAILED, f"{where}{error.strerror or error}"
    else:
        raise error
    print(f"{prefix}: {message}", file=sys.stderr)
    return status
