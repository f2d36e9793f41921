"""One line per request, as text or JSON (with every other log line JSON too). Query strings are
never logged: they carry ticket signatures; nor are request headers, which carry tokens.

Log lines are written by a thread of their own (``queued``): the event loop only queues a record,
it never waits on a write to stderr, which blocks when the pipe to a log collector is full."""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import re
import secrets
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.server.departures import status_of

# C0 and C1 controls and DEL, and the Unicode line breaks some log viewers honour: a newline in
# a (percent-decoded) path must not start a forged log line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with every control character written as a \\xNN / \\uNNNN escape."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


# What a request id from outside (a load balancer's, a client's) may look like to be kept: short,
# and nothing that could break a log line or a header.
_SANE_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
USER_AGENT_MAX = 256
# The text line; the fast path (proxy.server.fastpath) logs its hits with it too.
TEXT_LINE = "%(remote)s %(method)s %(path)s %(status)s %(bytes)s %(ms)sms %(cache)s %(tier)s %(id)s %(user_agent)s"
_REQUEST_ID = web.RequestKey("request_id", str)


def request_id(request: web.BaseRequest) -> str:
    """The request's id: a sane incoming ``X-Request-Id``, else a new random one; the same for
    the answer's header and the log line."""
    known = request.get(_REQUEST_ID)
    if known is None:
        known = request[_REQUEST_ID] = new_request_id(request.headers.get("X-Request-Id", ""))
    return known


def new_request_id(incoming: str) -> str:
    """``incoming`` if it is a sane id, else a new random one (also the fast path's)."""
    return incoming if _SANE_ID.fullmatch(incoming) else secrets.token_hex(8)


async def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """An on_response_prepare hook: every answer, errors and sendfile hits too, names its id."""
    response.headers["X-Request-Id"] = request_id(request)


class AccessLogger(AbstractAccessLogger):
    json_format = False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "id": request_id(request),
            "remote": request.remote,
            "method": request.method,
            "path": printable(request.path),  # no query string: it may hold a ticket's signature
            "status": status_of(request, response),
            "bytes": response.body_length,  # headers and body as sent (responses.SendfileResponse)
            "ms": round(time * 1000, 2),
            "cache": response.headers.get("X-Cache", "-"),
            "tier": response.headers.get("X-Cache-Tier", "-"),
            "user_agent": request.headers.get("User-Agent", "-")[:USER_AGENT_MAX],
        }
        if self.json_format:
            self.logger.info("request", extra={"request": fields})
        else:
            fields["user_agent"] = json.dumps(fields["user_agent"])  # quoted, control characters escaped
            self.logger.info(TEXT_LINE, fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class JsonAccessLogger(AccessLogger):
    json_format = True


class UtcFormatter(logging.Formatter):
    """Times in ISO 8601, UTC, to the millisecond: one clock for every host and worker."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(UtcFormatter):
    """One JSON object per line, for log collectors; an access line carries its fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def queued(handler: logging.Handler) -> logging.Handler:
    """A handler that queues records for ``handler``, which a thread writes as they come."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    listener.start()
    atexit.register(listener.stop)  # writes what is still queued before the process ends
    return _Enqueue(records)


class _Enqueue(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is bound now (its arguments may change once the call returns); formatting,
        # exception text included, is left to the writing thread's handler.
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        return record
