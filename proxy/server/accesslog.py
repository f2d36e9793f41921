"""One line per request, as text or JSON (with every other log line JSON too). Query strings are
never logged: they carry ticket signatures; nor are request headers, which carry tokens.

Log lines are written by a thread of their own (``queued``): the event loop only queues a record,
it never waits on a write to stderr, which blocks when the pipe to a log collector is full.

Access lines in ``casproxy serve`` are buffered, as nginx's ``access_log ... buffer= flush=``:
a logging call costs ~40 µs per line (record, caller lookup, locks, a thread woken per line),
more than a whole hot hit; ``AccessLog`` formats the line on the loop in a few µs and hands the
log thread one record per batch, written at most ``FLUSH_SECONDS`` later."""

from __future__ import annotations

import asyncio
import atexit
import copy
import itertools
import json
import logging
import logging.handlers
import os
import queue
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

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
_REQUEST_ID = web.RequestKey("request_id", str)


def request_id(request: web.BaseRequest) -> str:
    """The request's id: a sane incoming ``X-Request-Id``, else a new random one; the same for
    the answer's header and the log line."""
    known = request.get(_REQUEST_ID)
    if known is None:
        known = request[_REQUEST_ID] = new_request_id(request.headers.get("X-Request-Id", ""))
    return known


def new_request_id(incoming: str) -> str:
    """``incoming`` if it is a sane id, else a new one (also the fast path's): a random prefix
    per process and a counter, unique without a system call per request."""
    if incoming and _SANE_ID.fullmatch(incoming):
        return incoming
    return f"{_process.id_prefix}{next(_process.ids) & 0xFFFFFFFF:08x}"


class _Process:
    """This process's values, read once (``os.getpid`` is a system call); a forked child makes its own."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.id_prefix = secrets.token_hex(4)
        self.ids = itertools.count()


_process = _Process()
os.register_at_fork(after_in_child=lambda: globals().update(_process=_Process()))


async def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """An on_response_prepare hook: every answer, errors and sendfile hits too, names its id."""
    response.headers["X-Request-Id"] = request_id(request)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access logger, writing through ``AccessLog`` like the fast path."""

    json_format = False

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.lines = AccessLog.of(logger, json_format=self.json_format)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.lines.write(
            request.remote or "-",
            request.method,
            printable(request.path),  # no query string: it may hold a ticket's signature
            status_of(request, response),
            response.body_length,  # headers and body as sent (responses.SendfileResponse)
            time,
            response.headers.get("X-Cache", "-"),
            response.headers.get("X-Cache-Tier", "-"),
            request_id(request),
            request.headers.get("User-Agent", "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


FLUSH_SECONDS = 0.1  # the longest an access line waits for its batch to be written
BATCH_LINES = 2048  # a batch this long is handed over at once


class AccessLog:
    """Where access lines go. When ``logger``'s records all go to one ``queued`` handler whose
    formatter is ours (``casproxy serve``), lines are formatted here and queued in batches;
    otherwise (the library embedded, tests) each line is one logging call on ``logger``."""

    def __init__(self, logger: logging.Logger, *, json_format: bool) -> None:
        self.logger = logger
        self.json_format = json_format
        self.queue, self.formatter = _batching(logger)
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self.timer_loop: asyncio.AbstractEventLoop | None = None
        if self.queue is not None:
            atexit.register(self.flush)  # runs before the log thread stops: registered after it

    @classmethod
    def of(cls, logger: logging.Logger, *, json_format: bool) -> AccessLog:
        """The one AccessLog of ``logger``: aiohttp makes an access logger per connection, and
        the lines of all of them, and of the fast path, share one batch."""
        key = (logger.name, json_format)
        shared = _SHARED.get(key)
        if shared is None or shared.logger is not logger:
            shared = _SHARED[key] = cls(logger, json_format=json_format)
        return shared

    def write(  # one request's fields, positional: the hot path builds no dict
        self,
        remote: str,
        method: str,
        path: str,
        status: int,
        sent: int,
        seconds: float,
        cache: str,
        tier: str,
        request_id: str,
        user_agent: str,
    ) -> None:
        """Log one request (``sent``: bytes, head and body); called on the event loop."""
        ms = round(seconds * 1000, 2)
        user_agent = user_agent[:USER_AGENT_MAX]
        message: str | dict[str, Any]
        if self.json_format:
            message = {
                "id": request_id,
                "remote": remote,
                "method": method,
                "path": path,
                "status": status,
                "bytes": sent,
                "ms": ms,
                "cache": cache,
                "tier": tier,
                "user_agent": user_agent,
            }
        else:  # the user agent quoted, control characters escaped
            message = (
                f"{remote} {method} {path} {status} {sent} {ms}ms {cache} {tier} {request_id} {_quoted(user_agent)}"
            )
        if self.formatter is None:
            if isinstance(message, dict):
                self.logger.info("request", extra={"request": message})
            else:
                self.logger.info("%s", message)
            return
        self.lines.append(self.formatter.render(self.logger.name, message))
        if len(self.lines) >= BATCH_LINES:
            self.flush()
        else:
            loop = asyncio.get_running_loop()
            if self.timer is None or self.timer_loop is not loop:  # (a timer of a closed loop never fires)
                self.timer, self.timer_loop = loop.call_later(FLUSH_SECONDS, self.flush), loop

    def flush(self) -> None:
        """Hand the lines written so far to the log thread, as one record."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.lines and self.queue is not None:
            text, self.lines = "\n".join(self.lines), []
            record = logging.makeLogRecord({"name": self.logger.name, "msg": text, "levelno": logging.INFO})
            record.preformatted = True
            self.queue.put(record)


_SHARED: dict[tuple[str, bool], AccessLog] = {}
_QUOTED: dict[str, str] = {}  # clients send the same few User-Agents: quote each once


def _quoted(user_agent: str) -> str:
    """``user_agent`` quoted, control characters escaped (as JSON strings are)."""
    quoted = _QUOTED.get(user_agent)
    if quoted is None:
        if len(_QUOTED) >= 256:
            _QUOTED.clear()
        quoted = _QUOTED[user_agent] = json.dumps(user_agent)
    return quoted


def _batching(logger: logging.Logger) -> tuple[queue.SimpleQueue[logging.LogRecord] | None, UtcFormatter | None]:
    """The queue and formatter of the one ``queued`` handler that ``logger``'s records reach, if
    that is their only handler and its formatter is one of ours; else (None, None)."""
    handlers: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        handlers += node.handlers
        node = node.parent if node.propagate else None
    if len(handlers) == 1 and isinstance(handlers[0], _Enqueue):
        formatter = handlers[0].target.formatter
        if isinstance(formatter, UtcFormatter):
            return handlers[0].queue, formatter
    return None, None


class JsonAccessLogger(AccessLogger):
    json_format = True


_MILLISECONDS = [f".{n:03d}Z" for n in range(1000)]  # formatted once, not once a line


class UtcFormatter(logging.Formatter):
    """Times in ISO 8601, UTC, to the millisecond: one clock for every host and worker."""

    _second = -1
    _second_text = ""
    _templates: dict[str, tuple[str, str, str] | None]

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.time_text(record.created)

    def time_text(self, created: float) -> str:
        second, millisecond = divmod(int(created * 1000), 1000)
        if second != self._second:  # the date part changes once a second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return self._second_text + _MILLISECONDS[millisecond]

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "preformatted", False):  # a batch of AccessLog lines
            return record.getMessage()
        return super().format(record)

    def render(self, name: str, message: str | dict[str, Any]) -> str:
        """What ``format`` makes of an INFO record of ``name`` with ``message``, now, without
        the record: the fields of our own formats only."""
        now = self.time_text(time.time())
        template = self._template(name)
        if template is None:
            return self._fields_format(name, now, message)
        head, middle, tail = template
        return f"{head}{now}{middle}{message}{tail}"

    def _template(self, name: str) -> tuple[str, str, str] | None:
        """The format's text around the time and the message of an INFO line of ``name`` (one
        string join a line instead of a %-format), or None if the format is not that shape."""
        if "_templates" not in self.__dict__:
            self._templates = {}
        if name not in self._templates:
            text = self._fields_format(name, "\0", "\1")
            head, _, rest = text.partition("\0")
            middle, _, tail = rest.partition("\1")
            shaped = text.count("\0") == text.count("\1") == 1 and text.index("\0") < text.index("\1")
            self._templates[name] = (head, middle, tail) if shaped else None
        return self._templates[name]

    def _fields_format(self, name: str, now: str, message: str | dict[str, Any]) -> str:
        fields = {"asctime": now, "process": _process.pid, "levelname": "INFO", "name": name, "message": message}
        return self._fmt % fields if self._fmt else str(message)


class JsonFormatter(UtcFormatter):
    """One JSON object per line, for log collectors; an access line carries its fields."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "preformatted", False):
            return record.getMessage()
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

    def render(self, name: str, message: str | dict[str, Any]) -> str:
        line: dict[str, object] = {"time": self.time_text(time.time()), "level": "INFO", "logger": name}
        line["pid"] = _process.pid
        if isinstance(message, dict):
            line.update(message)
        else:
            line["message"] = message
        return json.dumps(line)


def queued(handler: logging.Handler) -> logging.Handler:
    """A handler that queues records for ``handler``, which a thread writes as they come."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    listener.start()
    atexit.register(listener.stop)  # writes what is still queued before the process ends
    return _Enqueue(records, handler)


class _Enqueue(logging.handlers.QueueHandler):
    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], target: logging.Handler) -> None:
        super().__init__(records)
        self.queue: queue.SimpleQueue[logging.LogRecord] = records
        self.target = target  # the handler the log thread writes with

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is bound now (its arguments may change once the call returns); formatting,
        # exception text included, is left to the writing thread's handler.
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        return record
