"""The ``casproxy`` command. User mistakes end in one line on stderr and a non-zero exit
(proxy.exits). Only the standard library is imported before a command runs, so ``--version``
and ``--help`` are quick and Ctrl-C while a command's imports load is not a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO, TypeVar
from urllib.parse import urlsplit

from proxy import __version__, exits
from proxy.transfer import cli as transfer_cli
from proxy.units import parse_duration

if TYPE_CHECKING:
    from proxy.client import AsyncClient, Ticket
    from proxy.config import Config

DEFAULT_URL = "http://127.0.0.1:8080"  # proxy.client's, without importing aiohttp for --help

log = logging.getLogger("casproxy")
T = TypeVar("T")
R = TypeVar("R")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, naming the flag (argparse's own prints the whole usage first)."""
        self.exit(exits.MISTAKE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="casproxy", description="Content-addressed caching blob proxy")
    parser.add_argument("--version", action="version", version=f"casproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key, its default and its CASPROXY_* variable: casproxy config --defaults",
    )
    _config_flag(serve)
    serve.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to bind; 0: any free one (default from config: 8080)")
    serve.add_argument("--workers", type=_positive, help="processes sharing the port and the disk cache")

    check = commands.add_parser("check-config", help="run serve's checks; print the resolved config, secrets redacted")
    _config_flag(check)

    config = commands.add_parser("config", help="print the resolved config (secrets redacted), or --defaults")
    config.add_argument("--defaults", action="store_true", help="the complete annotated config: every key's default")
    _config_flag(config)

    ticket = commands.add_parser("ticket", help="sign a ticket (an expiring URL) for a blob, offline")
    ticket.add_argument("hash", help="the blob's sha1 or sha256")
    ticket.add_argument("--ttl", type=_duration, help="how long it is valid, e.g. 1h (default: auth.ticket_ttl)")
    _config_flag(ticket)

    put = commands.add_parser("put", help="upload files; print one ticket JSON per line, in order")
    put.add_argument("files", nargs="+", metavar="FILE", help="files to upload")
    _server_flags(put, jobs=4)

    get = commands.add_parser("get", help="download blobs, verified, into files named by their hash")
    get.add_argument("refs", nargs="+", metavar="HASH", help="sha1 or sha256 hex digest, or a ticket URL")
    get.add_argument("-o", "--output", help="directory for the files (default: .); with one HASH, may be a file")
    _server_flags(get, jobs=16)

    transfer_cli.add_commands(commands)  # export, import

    cache = commands.add_parser("cache", help="inspect and repair the cache tiers (works while serving)")
    cache.add_argument(
        "action",
        choices=["stats", "check", "purge"],
        help="stats: size and entries; check: re-hash every disk cache entry, remove bad ones; "
        "purge HASH...: remove blobs from every cache tier",
    )
    cache.add_argument("hashes", nargs="*", metavar="HASH", help="for purge: the blobs to remove")
    _config_flag(cache)
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="config file (default: $CASPROXY_CONFIG or ./config.toml)")


def _server_flags(parser: argparse.ArgumentParser, jobs: int) -> None:
    parser.add_argument("--url", help=f"the proxy (default: $CASPROXY_URL or {DEFAULT_URL})")
    parser.add_argument("--token", help="bearer token (default: $CASPROXY_TOKEN)")
    parser.add_argument("-j", "--jobs", type=_positive, default=jobs, help=f"transfers at once (default: {jobs})")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want a whole number >= 1, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"want a port from 0 to 65535, got {text!r}")
    return int(text)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return _run(args)
    except BaseException as error:  # report() raises again what is not a user's mistake
        if isinstance(error, SystemExit):
            raise
        return exits.report(error)


def _run(args: argparse.Namespace) -> int:
    from proxy.config import load_config

    if args.command in ("put", "get"):
        return transfer(args)
    if args.command in ("export", "import"):
        return transfer_cli.run(args)
    if args.command == "serve":
        flags = {"host": args.host, "port": args.port, "workers": args.workers}
        return serve(load_config(args.config, overrides={"server": flags}))
    config = load_config(args.config)
    if args.command == "ticket":
        return sign_ticket(config, args.hash, args.ttl)
    if args.command == "cache":
        return asyncio.run(cache_command(config, args.action, args.hashes))
    if args.command == "config" and args.defaults:
        from proxy.config import reference

        print(reference(), end="")
        return 0
    if args.command == "check-config":
        from proxy.preflight import preflight

        preflight(config)
    from proxy.config import redacted

    print(json.dumps({"source": config.source, **redacted(config)}, indent=2, default=list))
    return 0


async def cache_command(config: Config, action: str, hashes: list[str]) -> int:
    """``casproxy cache stats|check|purge``: one JSON object on stdout; exit 1 if check removed
    anything. diskcache is safe to share between processes, so the server may be running."""
    from proxy.blocking import run
    from proxy.digest import Digest
    from proxy.preflight import preflight
    from proxy.service import build_store
    from proxy.tiers.disk import DiskTier

    if (action == "purge") != bool(hashes):
        raise exits.UsageError("give HASH arguments with purge, and only with purge")
    await run(preflight, config)  # it looks at the tiers' folders: not on the loop
    digests = [Digest.parse(text) for text in hashes]
    damaged = False
    async with build_store(config) as store:
        caches = [tier for tier in store.tiers if tier.role == "cache"]
        if action == "stats":
            report: dict[str, object] = {tier.name: {"kind": type(tier).__name__, **tier.describe()} for tier in caches}
        elif action == "purge":
            report = {digest: await store.delete(digest) for digest in digests}
        else:
            report = {}
            for tier in caches:
                if isinstance(tier, DiskTier):  # the one kind that can re-hash its entries
                    checked, removed = await tier.check()
                    report[tier.name] = {"checked": checked, "removed": removed}
                    damaged |= bool(removed)
    print(json.dumps(report, indent=2))
    return 1 if damaged else 0


def sign_ticket(config: Config, text: str, ttl: float | None) -> int:
    from proxy.digest import Digest
    from proxy.service import build_service

    digest = Digest.parse(text)
    print(json.dumps(build_service(config).signer.ticket(digest, None, ttl).as_json()))
    return 0


def transfer(args: argparse.Namespace) -> int:
    """``put`` or ``get``. A failure of one item is reported and the others go on; one that
    would fail every item (no server, no valid token) stops the lot. Either way: exit 1."""
    import aiohttp

    from proxy.client import AsyncClient
    from proxy.errors import Forbidden, Unauthorized

    url = args.url or os.environ.get("CASPROXY_URL") or DEFAULT_URL
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        flag = "--url" if args.url else "CASPROXY_URL"
        raise exits.UsageError(f"{flag}: {url!r} is not an http:// or https:// URL of a casproxy")
    client = AsyncClient(url, args.token or os.environ.get("CASPROXY_TOKEN"))
    try:
        if args.command == "put":
            sizes = [os.stat(f).st_size if os.path.isfile(f) else 0 for f in args.files]
            return asyncio.run(put_files(client, args.files, args.jobs, _Progress("put", len(args.files), sum(sizes))))
        output: str | None = args.output
        # One HASH and an -o that is not a directory: -o names the file itself.
        single = len(args.refs) == 1 and output is not None and not output.endswith("/") and not os.path.isdir(output)
        folder = Path(output or ".")
        (folder.parent if single else folder).mkdir(parents=True, exist_ok=True)
        progress = _Progress("get", len(args.refs), None)
        return asyncio.run(get_blobs(client, args.refs, folder, single, args.jobs, progress))
    except aiohttp.ClientConnectorError as error:
        print(f"casproxy: cannot reach {client.base_url}: {error.os_error.strerror or error}", file=sys.stderr)
    except Unauthorized as error:
        print(f"casproxy: {error.detail} (use --token or CASPROXY_TOKEN)", file=sys.stderr)
    except Forbidden as error:
        print(f"casproxy: {error.detail}", file=sys.stderr)
    return 1


async def put_files(client: AsyncClient, files: Sequence[str], jobs: int, progress: _Progress) -> int:
    def done(_: str, ticket: Ticket) -> None:
        progress.clear()
        print(json.dumps(ticket.as_json()), flush=True)

    async with client:
        return await _in_order(files, jobs, lambda f: client.put(f, progress=progress.add), done, progress)


async def get_blobs(
    client: AsyncClient, refs: Sequence[str], folder: Path, single: bool, jobs: int, progress: _Progress
) -> int:
    """Each blob into ``folder``/<hash>, or into the file ``folder`` when ``single``."""

    async def fetch(ref: str) -> int:
        digest, _ = client.locate(ref)
        return await client.download(
            ref, folder if single else folder / digest, progress=progress.add, sized=progress.expect
        )

    async with client:
        return await _in_order(refs, jobs, fetch, lambda _, __: None, progress)


async def _in_order(
    items: Sequence[T],
    jobs: int,
    work: Callable[[T], Awaitable[R]],
    done: Callable[[T, R], None],
    progress: _Progress,
) -> int:
    """``work`` on every item, ``jobs`` at a time; results go to ``done`` in input order."""
    limit = asyncio.Semaphore(jobs)

    async def one(item: T) -> R:
        async with limit:
            result = await work(item)
            progress.item_done()
            return result

    import aiohttp

    from proxy.errors import Forbidden, ProxyError, Unauthorized

    fatal = (aiohttp.ClientConnectorError, Unauthorized, Forbidden)
    tasks = [asyncio.ensure_future(one(item)) for item in items]
    failed = False
    try:
        for item, task in zip(items, tasks, strict=True):
            try:
                result = await task
            except fatal:
                raise
            except (ProxyError, OSError, ValueError, aiohttp.ClientError, TimeoutError) as error:
                failed = True
                progress.clear()
                print(f"casproxy: {item}: {_describe(error)}", file=sys.stderr)
            else:
                done(item, result)
    finally:
        progress.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 1 if failed else 0


def _describe(error: Exception) -> str:
    from proxy.errors import ProxyError

    if isinstance(error, ProxyError):
        return error.detail
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class _Progress:
    """One status line on stderr, only on a terminal and only for transfers long enough to
    watch; anything else printed clears it first."""

    def __init__(self, verb: str, count: int, total: int | None, stream: TextIO | None = None, delay: float = 1.0):
        self.verb, self.count, self.total, self.delay = verb, count, total, delay
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.shown = False
        self.bytes = 0
        self.items = 0
        self.sized: list[int] = []  # the sizes the server announced so far (get)

    def expect(self, size: int) -> None:
        """An item's size, known as it starts: the total grows, the rest guessed at their average."""
        self.sized.append(size)

    def _total(self) -> tuple[int | None, bool]:
        """The bytes of the whole transfer, and whether that is a guess."""
        if self.total:
            return self.total, False
        if not self.sized:
            return None, True
        known = sum(self.sized)
        left = max(0, self.count - len(self.sized))
        return known + left * known // len(self.sized), left > 0

    def add(self, size: int) -> None:
        self.bytes += size
        self._draw()

    def item_done(self) -> None:
        self.items += 1
        self._draw()

    def _draw(self) -> None:
        now = time.monotonic()
        # At most 5 redraws a second: a terminal is slow, and a fast transfer calls this a lot.
        if not self.enabled or now - self.started < self.delay or now - self.drawn_at < 0.2:
            return
        self.drawn_at = now
        rate = self.bytes / max(now - self.started, 1e-9)
        line = f"{self.verb}: {self.items}/{self.count} files, {_human(self.bytes)}"
        total, guess = self._total()
        if total:
            left = (total - self.bytes) / rate if rate else 0
            line += f" of {'~' if guess else ''}{_human(total)}, {_human(rate)}/s, {left:.0f}s left"
        else:
            line += f", {_human(rate)}/s"
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def serve(config: Config) -> int:
    from proxy.preflight import preflight
    from proxy.server.workers import serve as run

    preflight(config)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
