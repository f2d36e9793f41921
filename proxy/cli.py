"""The ``casproxy`` command. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, load_config, redacted
from proxy.errors import ConfigError, ProxyError
from proxy.units import parse_duration

log = logging.getLogger("casproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casproxy", description="Content-addressed caching blob proxy")
    parser.add_argument("--version", action="version", version=f"casproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _config_flag(serve)
    serve.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default from config: 8080)")
    serve.add_argument("--workers", type=int, help="processes sharing the port and the disk cache")

    check = commands.add_parser("check-config", help="print the resolved config, secrets redacted")
    _config_flag(check)

    ticket = commands.add_parser("ticket", help="sign a ticket (an expiring URL) for a blob, offline")
    ticket.add_argument("hash", help="the blob's sha1 or sha256")
    ticket.add_argument("--ttl", default=None, help="how long it is valid, e.g. 1h (default: auth.ticket_ttl)")
    _config_flag(ticket)
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="config file (default: $CASPROXY_CONFIG or ./config.toml)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = load_config(
                args.config, overrides={"server": {"host": args.host, "port": args.port, "workers": args.workers}}
            )
            return serve(config)
        if args.command == "ticket":
            return sign_ticket(load_config(args.config), args.hash, args.ttl)
        if args.command == "check-config":
            config = load_config(args.config)
            print(json.dumps({"source": config.source, **redacted(config)}, indent=2, default=list))
            return 0
    except ConfigError as error:
        print(f"casproxy: config error: {error}", file=sys.stderr)
        return 2
    except ProxyError as error:
        print(f"casproxy: {error.detail}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"casproxy: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def sign_ticket(config: Config, text: str, ttl: str | None) -> int:
    from proxy.digest import Digest
    from proxy.service import build_service

    digest = Digest.parse(text)
    seconds = parse_duration(ttl) if ttl is not None else None
    print(json.dumps(build_service(config).signer.ticket(digest, None, seconds).as_json()))
    return 0


def setup_logging(config: Config) -> None:
    fmt = "%(message)s" if config.server.log_format == "json" else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)


def serve(config: Config) -> int:
    from aiohttp import web

    from proxy.access import check_exposure
    from proxy.server.accesslog import AccessLogger, JsonAccessLogger
    from proxy.server.app import create_app

    setup_logging(config)
    check_exposure(config)
    if config.server.workers > 1:
        raise ConfigError("server.workers > 1 is not supported yet; run one process per port")
    app = create_app(config)
    logger: Any = JsonAccessLogger if config.server.log_format == "json" else AccessLogger
    log.info(
        "casproxy %s serving on http://%s:%d (config: %s)",
        __version__,
        config.server.host,
        config.server.port,
        config.source,
    )
    web.run_app(
        app,
        host=config.server.host,
        port=config.server.port,
        access_log_class=logger,
        access_log=logging.getLogger("casproxy.access") if config.server.access_log else None,
        print=None,
        handle_signals=True,
        loop=asyncio.new_event_loop(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
