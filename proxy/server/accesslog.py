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

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.server.departures import status_of

# C0 and C1 controls and DEL, and the Unicode line breaks some log viewers honour: a newline in
# a (percent-decoded) path must not start a forged log line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with every control character written as a \\xNN / \\uNNNN escape."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class AccessLogger(AbstractAccessLogger):
    json_format = False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": printable(request.path),  # no query string: it may hold a ticket's signature
            "status": status_of(request, response),
            "bytes": response.body_length,
            "ms": round(time * 1000, 2),
            "cache": response.headers.get("X-Cache", "-"),
            "tier": response.headers.get("X-Cache-Tier", "-"),
        }
        if self.json_format:
            self.logger.info("request", extra={"request": fields})
        else:
            self.logger.info("%(remote)s %(method)s %(path)s %(status)s %(bytes)s %(ms)sms %(cache)s %(tier)s", fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class JsonAccessLogger(AccessLogger):
    json_format = True


class JsonFormatter(logging.Formatter):
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
