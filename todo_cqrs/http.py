"""The HTTP edge: Litestar controllers, JWT auth, problem answers and operations endpoints.

Controllers stay thin: parse, call one command handler or one query, shape the answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import gc
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

import msgspec
import psycopg
from litestar import Litestar, Request, Response, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.datastructures import ResponseHeader, State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.types import (
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from todo_cqrs import __version__, auth, commands, db, queries
from todo_cqrs.commands import Answer, Idempotency
from todo_cqrs.config import Settings
from todo_cqrs.domain import (
    Command,
    CompleteTask,
    CreateTask,
    DeleteTask,
    EditTask,
    FieldError,
    InvalidCommand,
    ReopenTask,
    RestoreTask,
    parse_command,
    text_problem,
)
from todo_cqrs.eventstore import LISTENER_TTL, NewEventSignal, prune_listeners
from todo_cqrs.problems import PROBLEM_JSON, Problem, ProblemBody, bad_parameter, not_found
from todo_cqrs.queries import EventPage, FeedPage, TaskFilters, TaskPage, TaskView

log = logging.getLogger("todo_cqrs")

MAX_BODY = 64 * 1024
MAX_HEADERS = 64 * 1024  # in all; BoundedHeadProtocol bounds what httptools collects
# Events per read of a stream that catches up. A stream holds its page until a slow client
# has taken it: 100 events of the largest kind (10,000-character descriptions) are about
# 2 MB; a review saw 30 slow streams of 500 take a worker from 93 MB to 248 MB.
STREAM_PAGE = 100
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_encode = msgspec.json.Encoder().encode
_REQUEST_ID_FORM = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_IDEMPOTENCY_KEY_FORM = re.compile(r"[\x20-\x7e]{1,255}")
# The digits of an RFC 3339 time's seconds that a datetime cannot hold.
_PAST_MICROSECONDS = re.compile(r"(:[0-9]{2}\.[0-9]{6})[0-9]+")
_EVENT_POSITION_FORM = re.compile(r"[0-9]{1,18}")  # a bigint, never past its range
_VERSION_MAX = 2**31 - 1  # events.version is a PostgreSQL integer
_POSITION_MAX = 2**63 - 1  # events.position is a bigint
# Sent with every command answer when queries may go to a replica (QUERY_DATABASE_URL); a
# query that sends it back sees that command's effect.
CONSISTENCY_TOKEN = "X-Consistency-Token"
ConsistencyToken = Annotated[
    str | None,
    HeaderParameter(
        name=CONSISTENCY_TOKEN,
        description="A command answer's X-Consistency-Token: the answer reflects that command.",
    ),
]


# Request headers that the handlers declare for the OpenAPI document only: `_command` and
# `get_task` read them from the request themselves (every line of a repeated header).
IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        description='Act only if the task is at one of these versions ("3", a list, or *);'
        " else 412. Ignored on POST /tasks.",
    ),
]
IfNoneMatch = Annotated[
    str | None,
    HeaderParameter(name="If-None-Match", description='304 if the task is at one of these ("3").'),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="1-255 printable ASCII characters. A retry with the same key, method, path"
        " and JSON-equal body gets the first answer again (Idempotent-Replayed: true).",
    ),
]
_ETAG = ResponseHeader(name="ETag", documentation_only=True, description='The version, as "3"')
_REPLAYED = ResponseHeader(
    name="Idempotent-Replayed",
    documentation_only=True,
    description="true when the answer is a replay for an Idempotency-Key",
)
_COMMAND_HEADERS = [_ETAG, _REPLAYED]


# --- logging --------------------------------------------------------------------------------


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, carrying the request id of the request being served."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (request_id := REQUEST_ID.get()) is not None:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def configure_logging(level: str) -> None:
    # The JSON lines carry none of these, and collecting them for every record (the caller's
    # file and line, the thread, the process) costs 3% of a GET's instructions; see the
    # logging HOWTO's "Optimization" table.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# --- metrics --------------------------------------------------------------------------------

_multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
REQUESTS = Counter(
    "todo_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "todo_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
POOL_SIZE = Gauge(
    "todo_db_pool_connections", "Connections the pool holds", multiprocess_mode="livesum"
)
POOL_IN_USE = Gauge(
    "todo_db_pool_connections_in_use",
    "Connections lent out to requests",
    multiprocess_mode="livesum",
)
POOL_WAITING = Gauge(
    "todo_db_pool_requests_waiting",
    "Requests waiting for a connection",
    multiprocess_mode="livesum",
)


# The labelled children of REQUESTS and LATENCY, looked up once per (method, route, status):
# `labels()` checks and joins its arguments on every call.
_CHILDREN: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def _count(method: str, route: str, status: int, elapsed: float) -> None:
    children = _CHILDREN.get((method, route, status))
    if children is None:
        labels = (method, route, str(status))
        children = (REQUESTS.labels(*labels), LATENCY.labels(*labels))
        _CHILDREN[(method, route, status)] = children
    children[0].inc()
    children[1].observe(elapsed)


def _forget_dead_workers(folder: str) -> None:
    """Drop the live gauges of worker processes that died without a goodbye (SIGKILL, OOM;
    uvicorn starts a new worker, which runs this): prometheus_client would otherwise add
    their last values in forever (a review saw 39 pool connections for 2 workers of 10)."""
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            # Two new workers may clean up at once: the other one's removal is no error.
            with contextlib.suppress(FileNotFoundError):
                multiprocess.mark_process_dead(int(pid), folder)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, under another user


def _update_pool_gauges(pool: AsyncConnectionPool) -> None:
    stats = pool.get_stats()
    size = stats.get("pool_size", 0)
    POOL_SIZE.set(size)
    POOL_IN_USE.set(size - stats.get("pool_available", 0))
    POOL_WAITING.set(stats.get("requests_waiting", 0))


async def _housekeeping(pool: AsyncConnectionPool, signal: NewEventSignal) -> None:
    """Keep the pool gauges fresh and the event streams' registrations alive; prune old
    idempotency keys and expired registrations once an hour."""
    pruned_at = renewed_at = -3600.0
    while True:
        _update_pool_gauges(pool)
        if time.monotonic() - renewed_at >= LISTENER_TTL / 3:
            try:
                await signal.renew(pool)
                renewed_at = time.monotonic()
            except (psycopg.Error, PoolTimeout) as error:
                log.warning("could not renew the event streams' registrations: %s", error)
                renewed_at = time.monotonic() - LISTENER_TTL / 3 + 10  # again in 10 s
        if time.monotonic() - pruned_at >= 3600:
            try:
                await commands.prune_idempotency_keys(pool)
                await prune_listeners(pool)
                pruned_at = time.monotonic()
            except (psycopg.Error, PoolTimeout) as error:
                log.warning("could not prune idempotency keys or registrations: %s", error)
                pruned_at = time.monotonic() - 3600 + 60  # again in a minute
        await asyncio.sleep(2)


# --- the outermost layer: request id, access log, metrics -----------------------------------


async def _send_problem(send: Send, problem: Problem) -> None:
    """A problem answer sent straight over ASGI, for requests refused before Litestar."""
    body = problem.encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", b"%d" % len(body)),
        *((name.lower().encode(), value.encode()) for name, value in problem.headers.items()),
    ]
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": problem.status,
        "headers": headers,
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with limits on a request's head (its request line and
    headers), which `serve` runs instead of the plain one.

    httptools collects a header line however long it grows: a review's single 200 MB header
    took a worker to 455 MB and kept it from answering anyone for a minute, before the app's
    own 64 KiB check could see the request. And it waits for a head however slowly it comes
    (thousands of connections held open by a byte every 10 s). Past `head_limit` bytes, or
    `head_timeout` seconds after the connection opened (or, for a later request on it, after
    that request's first byte), a head still unfinished gets `431` or `408` and the
    connection is closed. Heads within the limit reach the app, which answers `431` to
    headers over MAX_HEADERS with a problem of its own.
    """

    head_limit = 2 * MAX_HEADERS  # room for a long URL beside 64 KiB of headers
    head_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes: int | None = 0  # None while no head is being read
        self._tail = b""  # the last bytes of the head so far: its end may span two reads
        self._unreadable: Problem | None = None  # to answer once the answers before it are out
        # From the connection's start: one that never sends a byte is closed too.
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.head_timeout, self._head_too_slow
        )

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)
            # Only the head counts, not the body or a next request that came with it in
            # this read (uvloop reads up to 256 KiB at once).
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(end + 4 - len(self._tail), 0)
            self._tail = window[-3:]
            if self._head_bytes > self.head_limit:
                self._refuse(Problem(431, "The request headers are too large."))
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes, self._tail = 0, b""  # what follows is the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def _head_done(self) -> None:
        self._head_bytes = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._head_bytes == 0:  # not a byte of a request: nothing to answer
            self._head_done()
            self.transport.close()
        else:
            self._refuse(Problem(408, "The request head did not arrive in time."))

    def _refuse(self, problem: Problem) -> None:
        self._head_done()
        if not self.transport.is_closing():
            self._answer_and_close(problem, "request head refused")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1 (a bad request line, a malformed
        header), as a problem with a request id like any other answer. Bytes that follow a
        request still being answered are answered after it: sent now, the 400 would read as
        that request's answer (stock uvicorn sends it, even after a POST that commits)."""
        problem = Problem(400, "The request is not valid HTTP/1.1.")
        if self.cycle is None or self.cycle.response_complete:
            self._answer_and_close(problem, "request refused")
        else:
            self._unreadable = problem

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # self.cycle is the last request read, so its answer is the last one before the 400.
        late, cycle = self._unreadable, self.cycle
        if late and cycle and cycle.response_complete and not self.transport.is_closing():
            self._answer_and_close(late, "request refused")

    def _answer_and_close(self, problem: Problem, what: str) -> None:
        """Answer from here, before any app sees the request: with a new request id (the
        caller's is somewhere in a head that cannot be read), logged with it."""
        request_id = os.urandom(16).hex()
        token = REQUEST_ID.set(request_id)
        log.warning("%s: %s", what, problem.detail)
        REQUEST_ID.reset(token)
        if self.cycle is None or self.cycle.response_complete:  # no answer being sent
            body = problem.encode()
            head = [
                f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}\r\n".encode(),
                *(
                    name + b": " + value + b"\r\n"
                    for name, value in self.server_state.default_headers
                ),
                f"content-type: {PROBLEM_JSON}\r\ncontent-length: {len(body)}\r\n"
                f"x-request-id: {request_id}\r\nconnection: close\r\n\r\n".encode(),
            ]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


# RFC 3339's date-time (its section 5.6). Litestar's parsing (msgspec's, lenient) takes more:
# seconds since the epoch ("1700000000") and offsets without a colon ("+0100").
_RFC3339_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_AS_OF_FORM = (
    "must be an RFC 3339 time with a UTC offset, like 2026-11-22T10:00:00Z (+ sent as %2B)"
)
# Parameters that Litestar would convert leniently (`limit=1e2` as 100, `version=1.0` as 1,
# `completed=1` as true, `as_of=1700000000` as a Unix time, `as_of=null` as none given): only
# the forms that the contract names get through. No endpoint takes these names in another
# sense.
_WHOLE_NUMBER = (re.compile(r"0|[1-9][0-9]*"), "must be a whole number, with no leading zero")
_STRICT_PARAMETERS = {
    "limit": _WHOLE_NUMBER,
    "after": _WHOLE_NUMBER,
    "version": _WHOLE_NUMBER,
    "completed": (re.compile(r"true|false"), "must be true or false"),
    "as_of": (_RFC3339_TIME, _AS_OF_FORM),
    "due_before": (re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), "must be a date, like 2026-11-22"),
}


def _query_problem(query: bytes) -> Problem | None:
    """A parameter given more than once, or a number, boolean, date or time in a form the
    contract does not name. Litestar would keep the last value of a repeated parameter and
    drop the others unchecked (`limit=abc&limit=1`), so such a request is refused; no
    endpoint takes a list."""
    if not query:
        return None
    # Clients send the same few short queries (`limit=50`) over and over, and parsing one
    # costs 5 µs, 1.5% of a list request: the answers for up to 1,024 short ones are kept.
    return _short_query_problem(query) if len(query) <= 200 else _parsed_query_problem(query)


def _parsed_query_problem(query: bytes) -> Problem | None:
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    counts = collections.Counter(name for name, _ in pairs)
    if len(counts) < len(pairs):
        # At most ten names of at most 100 characters: a long query makes no longer an answer.
        repeated = sorted(name[:100] for name, count in counts.items() if count > 1)[:10]
        errors = [FieldError(name, "given more than once") for name in repeated]
        return Problem(400, "Give each query parameter once.", errors=errors)
    errors = [
        FieldError(name, strict[1])
        for name, value in pairs
        if (strict := _STRICT_PARAMETERS.get(name)) and not strict[0].fullmatch(value)
    ]
    return Problem(400, "Malformed query parameters.", errors=errors) if errors else None


_short_query_problem = functools.lru_cache(maxsize=1024)(_parsed_query_problem)


class _Deadlines:
    """The requests whose answer has not begun, and when each is due. One check per worker,
    every half second while any are waiting, cancels those past it: a timer per request
    (asyncio.timeout) cost 35 k instructions a request, 4% of a `get` (BENCHMARKS.md).

    A request still running a second after its cancel is cancelled again, and so on each
    second: psycopg answers a cancel by asking the server to cancel the statement (up to 5 s)
    and waiting for it (5 s more); a second cancel makes it close the connection at once, so
    a frozen server holds a request 2 to 3 s past its deadline, not 12.

    One event loop at a time: uvicorn's worker has one, and so has each test client, one
    after another; a loop's requests are forgotten when one on another loop begins."""

    recancel_after = 1.0

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.due: dict[asyncio.Task[Any], float] = {}
        self.cancels: dict[asyncio.Task[Any], int] = {}  # by this, not by uvicorn
        self._checker: asyncio.Task[None] | None = None

    def watch(self) -> asyncio.Task[Any]:
        """Start the current request's deadline; its task, to `stop` it with."""
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        self.due[task] = loop.time() + self.seconds
        checker = self._checker
        if checker is None or checker.done() or checker.get_loop() is not loop:
            # A check on another loop (a test client's, closed since) sees none of these.
            for other in [t for t in self.due if t.get_loop() is not loop]:
                self.stop(other)
            self._checker = loop.create_task(self._check())
        return task

    def stop(self, task: asyncio.Task[Any]) -> int:
        """End the task's deadline; how many times it was cancelled for passing it."""
        self.due.pop(task, None)
        return self.cancels.pop(task, 0)

    async def _check(self) -> None:
        this = asyncio.current_task()
        try:
            while self.due:
                await asyncio.sleep(0.5)
                now = asyncio.get_running_loop().time()
                for task, due in list(self.due.items()):
                    if due <= now:
                        self.due[task] = now + self.recancel_after
                        self.cancels[task] = self.cancels.get(task, 0) + 1
                        task.cancel()
        finally:
            if self._checker is this:  # not one started since on another loop
                self._checker = None


class ServiceEdge:
    """Wraps the whole Litestar app, so that every answer (unrouted 404s included) carries
    X-Request-ID, is counted, and is logged once, and no request waits on for its answer
    past `request_timeout`."""

    def __init__(self, app: Litestar, request_timeout: float) -> None:
        self.app = app
        self.deadlines = _Deadlines(request_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        # Stripped: RFC 9110 field values carry no surrounding whitespace.
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").strip()
        # A new id is 128 random bits in hex, as uuid4().hex was, at a fifth of its cost.
        request_id = (
            given.decode("latin-1") if _REQUEST_ID_FORM.fullmatch(given) else os.urandom(16).hex()
        )
        token = REQUEST_ID.set(request_id)
        status = 500
        started = time.perf_counter()

        started_response = False
        deadlines = self.deadlines
        task = deadlines.watch()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                # An answer under way (a stream) runs on; a deadline's cancel that the app
                # swallowed (psycopg_pool hands over a connection that came with it) is
                # forgotten, so that a cut at shutdown is not taken for it.
                for _ in range(deadlines.stop(task)):
                    task.uncancel()
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADERS:
                await _send_problem(
                    send_with_id, Problem(431, "The request headers are too large.")
                )
            elif problem := _query_problem(scope["query_string"]):
                await _send_problem(send_with_id, problem)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # Before any await here: the check must not cut the 503 or the shutdown cut.
            if cancels := deadlines.stop(task):
                # Cancelled inside a database call, psycopg first asks the server to cancel
                # the statement, and closes the connection when cancelled again. A command
                # cut that way committed unanswered, or rolls back once the server sees the
                # connection closed; a retry with its Idempotency-Key then gets the answer.
                for _ in range(cancels):
                    task.uncancel()
                log.warning("request passed TODO_REQUEST_TIMEOUT (%s s)", deadlines.seconds)
                if not started_response:
                    await _send_problem(
                        send_with_id,
                        Problem(
                            503,
                            "The service could not answer in time; retry shortly.",
                            headers={"Retry-After": "1"},
                        ),
                    )
            else:
                # Otherwise only uvicorn cancels a request from outside (the app's own
                # cancellations stay inside its task groups): at shutdown, past
                # TODO_SHUTDOWN_TIMEOUT, to cut what still runs, mostly event streams. That
                # is the documented end of such a request, not an error: end its answer (a
                # stream) or give one (503), and say so in one line, rather than leave
                # uvicorn to log an error and send a bare 500.
                log.info("request cut at shutdown")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_cut(send_with_id, started_response), 1.0)
        finally:
            deadlines.stop(task)
            elapsed = time.perf_counter() - started
            _count(method, scope.get("path_template") or "unrouted", status, elapsed)
            log.info(
                "request",
                extra={
                    "fields": {
                        "method": method,
                        "path": scope["path"],
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                    }
                },
            )
            REQUEST_ID.reset(token)


async def _cut(send: Send, started: bool) -> None:
    if started:
        end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(end)
    else:
        await _send_problem(
            send, Problem(503, "The service is stopping; retry.", headers={"Retry-After": "1"})
        )


# --- auth -----------------------------------------------------------------------------------


class JWTAuth(AbstractAuthenticationMiddleware):
    """Bearer JWTs, checked by the app's `auth.Verifier` (keys, algorithms, claims)."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        verifier: auth.Verifier = connection.app.state.verifier
        scheme, _, token = connection.headers.get("authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Problem(
                401, "A bearer token is required.", headers={"WWW-Authenticate": "Bearer"}
            )
        try:
            user = await verifier.verify(token)
        except auth.InvalidToken as error:
            raise Problem(
                401,
                f"The token is not valid: {error}.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            ) from None
        except auth.KeysUnavailable as error:
            raise Problem(
                503, str(error), headers={"Retry-After": str(error.retry_after)}
            ) from None
        return AuthenticationResult(user=user, auth=token)


# --- errors ---------------------------------------------------------------------------------


def problem_response(problem: Problem) -> Response[ProblemBody]:
    return Response(
        problem.body(),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def _on_problem(_: Request[Any, Any, Any], exc: Problem) -> Response[ProblemBody]:
    return problem_response(exc)


def _field_errors(exc: HTTPException) -> list[FieldError] | None:
    """Litestar's validation details (of query parameters) as the contract's field list."""
    if not isinstance(exc.extra, list):
        return None
    errors = [
        FieldError(field=str(item.get("key", "")), message=str(item.get("message", "")))
        for item in exc.extra
        if isinstance(item, dict)
    ]
    return errors or None


def _on_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ProblemBody]:
    headers = dict(exc.headers or {})
    if exc.status_code >= 500:
        log.error("server error", exc_info=exc)
        return problem_response(Problem(exc.status_code, "The service failed.", headers=headers))
    return problem_response(
        Problem(exc.status_code, exc.detail, errors=_field_errors(exc), headers=headers)
    )


def _on_database_down(request: Request[Any, Any, Any], exc: Exception) -> Response[ProblemBody]:
    log.warning("database unavailable: %s", exc)
    if db.connection_lost(exc):
        _check_idle_connections(request.app.state.pool)
    return problem_response(
        Problem(503, "The database is not reachable; retry shortly.", headers={"Retry-After": "1"})
    )


_pool_checks: set[asyncio.Task[None]] = set()


def _check_idle_connections(pool: AsyncConnectionPool) -> None:
    """One broken connection means that the idle ones probably broke too (the database
    restarted): test them all now, in the background, so that each of them does not fail a
    request of its own once the database is back (a review saw pool-size 503s per worker)."""
    if not _pool_checks:  # one check at a time
        check = asyncio.get_running_loop().create_task(_check(pool))
        _pool_checks.add(check)
        check.add_done_callback(_pool_checks.discard)


async def _check(pool: AsyncConnectionPool) -> None:
    try:
        await pool.check()  # drops the broken ones; the pool opens new ones as it needs them
    except (psycopg.Error, PoolTimeout) as error:
        log.warning("could not check the pool's idle connections: %s", error)


def _on_not_migrated(_: Request[Any, Any, Any], exc: Exception) -> Response[ProblemBody]:
    # Only a server started without `serve` (which migrates first) gets here, or one whose
    # database was rolled back under it; /ready says the same.
    log.error("the database is not migrated: %s", exc)
    return problem_response(
        Problem(
            503,
            "The database lacks migrations; run `todo-cqrs migrate`.",
            headers={"Retry-After": "5"},
        )
    )


def _on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[ProblemBody]:
    log.error("unexpected error", exc_info=exc)
    return problem_response(Problem(500, "The service failed; the error is logged."))


# --- request parsing helpers ----------------------------------------------------------------


# A UUID as RFC 9562 writes it (either case): not the other spellings that uuid.UUID takes
# (braces, `urn:uuid:`, no hyphens), which would make one task answer at several paths.
_UUID_FORM = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def _task_uuid(task_id: str) -> uuid.UUID:
    if not _UUID_FORM.fullmatch(task_id):
        raise not_found()  # a malformed id names no task of yours
    return uuid.UUID(task_id)


# One member of an entity-tag list (RFC 9110 8.8.3, 5.6.1): `*`, `"tag"` or `W/"tag"`, or
# nothing (empty members are allowed), then a comma or the end. Possessive (`*+`): a run of
# spaces is never re-split, or a long one before a bad character costs quadratic time.
_ENTITY_TAG_MEMBER = re.compile(
    r'[ \t]*+(?:(\*)|(W/)?"([\x21\x23-\x7e\x80-\xff]*+)")?[ \t]*+(?:,|\Z)'
)


def _entity_tags(request: Request[Any, Any, Any], name: str) -> list[tuple[str, bool]] | None:
    """If-Match or If-None-Match as (tag, weak) pairs; None when absent or `*`. Repeated
    header lines form one list (RFC 9110 5.3); a malformed or empty list answers 400."""
    lines = request.headers.getall(name, None)
    if not lines:
        return None
    header, position = ", ".join(lines), 0
    tags: list[tuple[str, bool]] = []
    while position < len(header):
        member = _ENTITY_TAG_MEMBER.match(header, position)
        if member is None:
            break
        star, weak, tag = member.groups()
        if star:
            return None
        if tag is not None:
            tags.append((tag, weak is not None))
        position = member.end()
    if position < len(header) or not tags:
        raise Problem(400, f'{name} must be "*" or a list of entity tags like "3".')
    return tags


def _if_match(request: Request[Any, Any, Any]) -> frozenset[str] | None:
    """The strong tags of If-Match; None when absent or `*`. Weak tags never match (RFC
    9110's strong comparison): a list of only weak tags answers 412."""
    tags = _entity_tags(request, "If-Match")
    return None if tags is None else frozenset(tag for tag, weak in tags if not weak)


def _idempotency(request: Request[Any, Any, Any], body: bytes) -> Idempotency | None:
    keys = request.headers.getall("idempotency-key", None)
    if not keys:
        return None
    if len(keys) > 1:
        raise Problem(400, "Send one Idempotency-Key, not several.")
    key = keys[0]
    if not _IDEMPOTENCY_KEY_FORM.fullmatch(key):
        raise Problem(400, "Idempotency-Key must be 1 to 255 printable ASCII characters.")
    return Idempotency(
        key=key,
        fingerprint=commands.fingerprint(request.method, request.url.path, body),
    )


def _parsed(request: Request[str, Any, Any]) -> dict[str, Any]:
    """The request's state, as `request.state` holds it, without the wrapper (and lock) that
    Litestar makes anew at each access of `request.state`: about 20 k instructions each."""
    state: dict[str, Any] = request.scope["state"]
    return state


async def _parse_body(request: Request[str, Any, Any]) -> Response[Any] | None:
    """Before create and patch: decode and check the body here rather than in Litestar, so
    that every offending field is listed, and a refused request under an Idempotency-Key is
    answered (and replayed) like any other. The command and the id of its task (the path's,
    or a new task's) wait for the handler in `_parsed(request)`."""
    kind = CreateTask if request.method == "POST" else EditTask
    parsed, task_id = _parsed(request), request.path_params.get("task_id")
    # First: a path that names no task answers 404, whatever the body.
    parsed["task_id"] = _task_uuid(task_id) if task_id is not None else uuid.uuid4()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise Problem(415, "The body must be JSON (Content-Type: application/json).")
        try:
            body = msgspec.json.decode(await request.body())
        except (msgspec.DecodeError, UnicodeDecodeError) as error:
            raise Problem(400, f"The body is not valid JSON: {error}") from None
        except RecursionError:  # msgspec's answer to JSON nested thousands deep
            raise Problem(400, "The body is nested too deeply.") from None
        try:
            parsed["command"] = parse_command(kind, body)
        except InvalidCommand as invalid:
            raise Problem(400, "The request has invalid fields.", errors=invalid.errors) from None
    except Problem as problem:
        if "idempotency-key" not in request.headers:
            raise
        return await _command(request, parsed["task_id"], problem)
    return None


def _reader(request: Request[Any, Any, Any], given: str | None) -> db.Connections:
    """Where this request's queries read (see `db.QueryRouter`); given: its token."""
    router: db.QueryRouter = request.app.state.router
    if given is None:
        return router.reader()
    token = db.parse_lsn(given.strip())
    if token is None:
        raise Problem(400, f"{CONSISTENCY_TOKEN} must be a token from a command's answer.")
    return router.reader(token)


def _answer(answer: Answer) -> Response[Any]:
    headers = {}
    if answer.location:
        headers["Location"] = answer.location
    if answer.etag:
        headers["ETag"] = answer.etag
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    if answer.consistency_token:
        headers[CONSISTENCY_TOKEN] = answer.consistency_token
    media_type = PROBLEM_JSON if answer.status >= 400 else "application/json"
    return Response(answer.body, status_code=answer.status, headers=headers, media_type=media_type)


async def _command(
    request: Request[str, Any, Any], task_id: uuid.UUID, command: Command | Problem
) -> Response[Any]:
    # Read on every command, those that take no body included: over 64 KiB answers 413
    # whatever the command (Litestar checks the size as it reads).
    body = await request.body()
    idempotency = _idempotency(request, body)
    try:
        # On POST /tasks the task does not exist yet: If-Match is ignored (README).
        if_match = _if_match(request) if "task_id" in request.path_params else None
    except Problem as problem:
        if_match, command = None, problem
    if isinstance(command, Problem) and idempotency is None:
        raise command
    answer = await commands.execute(
        request.app.state.pool,
        request.user,
        task_id,
        command,
        if_match=if_match,
        idempotency=idempotency,
        request_id=REQUEST_ID.get(),
        consistency_token=request.app.state.router.replica is not None,
    )
    return _answer(answer)


# --- controllers ----------------------------------------------------------------------------

_ERRORS = {
    code: ResponseSpec(ProblemBody, description=text, media_type=PROBLEM_JSON)
    for code, text in {
        400: "Invalid input",
        401: "Missing or invalid token",
        404: "No such task",
        409: "Conflict",
        412: "If-Match does not name the current version",
        413: "Body over 64 KiB",
        415: "Body is not JSON",
        422: "Idempotency-Key reused for a different request",
        503: "Database unavailable",
    }.items()
}


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {code: _ERRORS[code] for code in (401, 503, *codes)}


# `data` documents the body in the OpenAPI schema (and edit_task's `task_id` the path);
# `_parse_body` has parsed them already.


@post(
    "/tasks",
    before_request=_parse_body,
    responses=_errors(400, 409, 413, 415, 422),
    response_headers=[
        ResponseHeader(
            name="Location", documentation_only=True, description="/tasks/{id} of the new task"
        ),
        *_COMMAND_HEADERS,
    ],
)
async def create_task(
    request: Request[str, Any, Any],
    data: JSONBody[CreateTask],
    idempotency_key: IdempotencyKey = None,
) -> Response[TaskView]:
    """Create a task (`TaskCreated`)."""
    parsed = _parsed(request)
    return await _command(request, parsed["task_id"], parsed["command"])


@patch(
    "/tasks/{task_id:str}",
    before_request=_parse_body,
    responses=_errors(400, 404, 409, 412, 413, 415, 422),
    response_headers=_COMMAND_HEADERS,
)
async def edit_task(
    request: Request[str, Any, Any],
    task_id: FromPath[str],
    data: JSONBody[EditTask],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[TaskView]:
    """Change any of title, description, priority, due_date, tags, completed."""
    parsed = _parsed(request)
    return await _command(request, parsed["task_id"], parsed["command"])


_BODILESS_COMMAND_ERRORS = _errors(400, 404, 409, 412, 413, 422)


@post(
    "/tasks/{task_id:str}/complete",
    status_code=200,
    responses=_BODILESS_COMMAND_ERRORS,
    response_headers=_COMMAND_HEADERS,
)
async def complete_task(
    request: Request[str, Any, Any],
    task_id: FromPath[str],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[TaskView]:
    return await _command(request, _task_uuid(task_id), CompleteTask())


@post(
    "/tasks/{task_id:str}/reopen",
    status_code=200,
    responses=_BODILESS_COMMAND_ERRORS,
    response_headers=_COMMAND_HEADERS,
)
async def reopen_task(
    request: Request[str, Any, Any],
    task_id: FromPath[str],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[TaskView]:
    return await _command(request, _task_uuid(task_id), ReopenTask())


@delete(
    "/tasks/{task_id:str}",
    status_code=204,
    responses={**_BODILESS_COMMAND_ERRORS, 204: ResponseSpec(None, description="Deleted")},
    response_headers=[_REPLAYED],
)
async def delete_task(
    request: Request[str, Any, Any],
    task_id: FromPath[str],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[None]:
    """Delete a task (`TaskDeleted`); its history stays and it can be restored."""
    return await _command(request, _task_uuid(task_id), DeleteTask())


@post(
    "/tasks/{task_id:str}/restore",
    status_code=200,
    responses=_BODILESS_COMMAND_ERRORS,
    response_headers=_COMMAND_HEADERS,
)
async def restore_task(
    request: Request[str, Any, Any],
    task_id: FromPath[str],
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> Response[TaskView]:
    """Bring a deleted task back as it was; `409` if it is not deleted."""
    return await _command(request, _task_uuid(task_id), RestoreTask())


@get("/tasks", responses=_errors(400))
async def list_tasks(
    request: Request[str, Any, Any],
    completed: FromQuery[bool | None] = None,
    tag: FromQuery[str | None] = None,
    q: FromQuery[str | None] = None,
    due_before: FromQuery[date | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    cursor: FromQuery[str | None] = None,
    consistency_token: ConsistencyToken = None,
) -> Response[TaskPage]:
    """The user's tasks, newest first, keyset-paginated."""
    for name, value in (("tag", tag), ("q", q), ("cursor", cursor)):
        if value is not None and (message := text_problem(value)):
            raise bad_parameter(name, message)
    filters = TaskFilters(completed=completed, tag=tag, q=q, due_before=due_before)
    source = _reader(request, consistency_token)
    page = await queries.list_tasks(source, request.user, filters, limit, cursor)
    return Response(page, media_type="application/json")  # type: ignore[arg-type]


@get(
    "/tasks/{task_id:str}",
    responses={**_errors(400, 404), 304: ResponseSpec(None, description="Not modified")},
    response_headers=[_ETAG],
)
async def get_task(
    request: Request[str, Any, Any],
    task_id: FromPath[str],
    version: Annotated[int | None, QueryParameter(ge=1)] = None,
    as_of: FromQuery[datetime | None] = None,
    consistency_token: ConsistencyToken = None,
    if_none_match: IfNoneMatch = None,
) -> Response[TaskView]:
    """The task, with `ETag`; `304` when `If-None-Match` names its version.

    Time travel: `version=N` or `as_of=<RFC 3339>` folds its events up to that point.
    """
    source, user, uid = _reader(request, consistency_token), request.user, _task_uuid(task_id)
    if version is not None and as_of is not None:
        raise Problem(
            400,
            "Give version or as_of, not both.",
            errors=[FieldError(name, "not with the other") for name in ("version", "as_of")],
        )
    if as_of is not None and _PAST_MICROSECONDS.search(given := request.query_params["as_of"]):
        # Parsing rounded to the nearest microsecond, which may be after the moment asked
        # for and show an event from after it: round down instead (parsed as Litestar does).
        as_of = msgspec.convert(_PAST_MICROSECONDS.sub(r"\1", given), datetime, strict=False)
    if version is not None and version > _VERSION_MAX:
        raise not_found()  # past the current version of any task: versions are int4
    if version is None and as_of is None:
        task = await queries.get_task(source, user, uid)
    else:
        task = await queries.task_at(source, user, uid, version=version, as_of=as_of)
    etag = f'"{task.version}"'
    if "if-none-match" in request.headers:
        tags = _entity_tags(request, "If-None-Match")
        # Weak comparison, as RFC 9110 asks for If-None-Match: W/"3" matches version 3.
        if tags is None or any(tag == str(task.version) for tag, _ in tags):
            return Response(None, status_code=304, headers={"ETag": etag})  # type: ignore[arg-type]
    return Response(task.json, headers={"ETag": etag}, media_type="application/json")  # type: ignore[arg-type]


@get("/tasks/{task_id:str}/history", responses=_errors(400, 404))
async def task_history(
    request: Request[str, Any, Any],
    task_id: FromPath[str],
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 100,
    cursor: FromQuery[str | None] = None,
    consistency_token: ConsistencyToken = None,
) -> EventPage:
    """Every event of the task, oldest first; works after deletion."""
    return await queries.task_history(
        _reader(request, consistency_token), request.user, _task_uuid(task_id), limit, cursor
    )


@get("/events", responses=_errors(400))
async def list_events(
    request: Request[str, Any, Any],
    after: Annotated[int, QueryParameter(ge=0, le=_POSITION_MAX)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    consistency_token: ConsistencyToken = None,
) -> FeedPage:
    """The user's events across all tasks in commit order; poll with `after=next_position`."""
    source = _reader(request, consistency_token)
    page, _ = await queries.user_events(source, request.user, after, limit)
    return page


@get("/events/stream", media_type="text/event-stream", responses=_errors(400))
async def stream_events(
    request: Request[str, Any, Any],
    after: Annotated[int | None, QueryParameter(ge=0, le=_POSITION_MAX)] = None,
    last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
) -> ServerSentEvent:
    """Server-Sent Events of the user's events as they commit (`id:` is the position).

    Read from the primary, where the NOTIFY that wakes the stream comes from. Starts
    after `Last-Event-ID` (a reconnecting EventSource sends it), else after `after`, else
    at the newest event, and says where with a first message of only `id:`; a comment line
    at least every heartbeat keeps proxies open.
    """
    pool: AsyncConnectionPool = request.app.state.pool
    signal: NewEventSignal = request.app.state.signal
    settings: Settings = request.app.state.settings
    user: str = request.user
    if last_event_id is not None:
        last_event_id = last_event_id.strip(" \t")  # RFC 9110: no surrounding whitespace
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not _EVENT_POSITION_FORM.fullmatch(last_event_id):
            raise Problem(400, "Last-Event-ID must be an event position.")
        after = int(last_event_id)
    if after is None:
        after = await queries.last_position(pool, user)
    position = after

    async def messages() -> AsyncIterator[ServerSentEventMessage]:
        nonlocal position
        flag = signal.subscribe(user)
        # The heartbeat is due `heartbeat` seconds after the last message sent, however often
        # the stream wakes up meanwhile without anything to send.
        last_sent = time.monotonic()
        failing = False
        try:
            await signal.register(pool, user)  # before the first read (its docstring says why)
            # Where the stream starts, as the id of a message without data (which dispatches
            # no event): a client that leaves before any event comes sends it back as
            # Last-Event-ID, and gets what was committed meanwhile.
            yield ServerSentEventMessage(data=None, id=str(position))
            while True:
                flag.clear()
                try:
                    page, more = await queries.user_events(pool, user, position, STREAM_PAGE)
                    failing = False
                except (psycopg.Error, PoolTimeout) as error:
                    # The stream stays open and tries again at the next wake-up or heartbeat;
                    # it says so once, not at each try (an outage has many streams open).
                    if not failing:
                        log.warning("event stream could not read the feed: %s", error)
                    failing = True
                    page, more = queries.FeedPage(items=[], next_position=position), False
                for event in page.items:
                    yield ServerSentEventMessage(
                        data=_encode(event).decode(), id=str(event.position)
                    )
                    last_sent = time.monotonic()
                position = page.next_position
                if more:
                    continue
                try:
                    due = last_sent + settings.heartbeat - time.monotonic()
                    await asyncio.wait_for(flag.wait(), max(due, 0.0))
                except TimeoutError:
                    yield ServerSentEventMessage(data=None, comment="heartbeat")
                    last_sent = time.monotonic()
        finally:
            signal.unsubscribe(pool, user, flag)

    return ServerSentEvent(messages())


# --- operations -----------------------------------------------------------------------------


class Health(msgspec.Struct):
    status: str


@get("/health", exclude_from_auth=True, security=[{}])
async def health() -> Health:
    """200 while the process is up."""
    return Health(status="ok")


@get("/ready", exclude_from_auth=True, security=[{}], responses={503: _ERRORS[503]})
async def ready(request: Request[Any, Any, Any]) -> Health:
    """200 when the database answers and every migration is applied."""
    pool: AsyncConnectionPool = request.app.state.pool
    try:
        async with pool.connection(timeout=2) as conn:
            pending = await db.pending_migrations(conn)
    except (psycopg.Error, PoolTimeout) as error:
        raise Problem(
            503, f"The database is not reachable: {error}", headers={"Retry-After": "1"}
        ) from None
    if pending:
        raise Problem(
            503, f"Migrations not applied: {', '.join(pending)}", headers={"Retry-After": "5"}
        )
    return Health(status="ready")


@get("/metrics", exclude_from_auth=True, include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus text format; with several workers, the sum over all of them."""
    _update_pool_gauges(request.app.state.pool)
    if _multiprocess:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        output = generate_latest(registry)
    else:
        output = generate_latest()
    # As a header: given as media_type, Litestar appends a second "; charset=utf-8".
    return Response(output, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- the app --------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> ServiceEdge:
    """The ASGI app. DATABASE_URL must name the database (`serve` sets it for the embedded one)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)  # here, so that every worker process logs as JSON
    if settings.database_url is None:
        raise RuntimeError("DATABASE_URL is not set; `todo-cqrs serve` starts a database for you")
    pools = [
        db.create_pool(
            url,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            timeout=settings.pool_timeout,
            prepared_statements=settings.prepared_statements,
        )
        for url in (settings.database_url, settings.query_database_url)
        if url is not None
    ]
    pool = pools[0]
    router = db.QueryRouter(pool, pools[1] if len(pools) > 1 else None, settings.replica_wait)
    signal = NewEventSignal(settings.listen_database_url or settings.database_url)
    verifier = auth.Verifier.from_settings(settings)  # a bad key fails here, at start

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if _multiprocess:
            _forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        # What exists by now (modules, the app, its routes and schema) lives as long as the
        # process. Frozen, it is out of the collector's sight: a full collection then scans
        # only what requests left behind. Unfrozen, each of a worker's few full collections
        # under load stopped every request in it for 60-85 ms (BENCHMARKS.md, 2026-12-05).
        # Once per process: the apps a test process makes one after another stay collectable.
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
        for each in pools:  # a database that is down at start means 503s, not a crash
            await each.open(wait=False)
        helpers = [
            asyncio.create_task(_housekeeping(pool, signal)),
            asyncio.create_task(signal.run()),
        ]
        try:
            yield
        finally:
            for helper in helpers:
                helper.cancel()
            # Bounded: a cancellation that lands inside a failing driver call can be lost
            # (seen with psycopg 3.3.9), and the stop must not wait for it forever.
            done, _ = await asyncio.wait(helpers, timeout=5)
            for helper in done:
                if not helper.cancelled() and (error := helper.exception()) is not None:
                    log.error("background task failed", exc_info=error)  # died before
            await signal.close(pool)
            for each in pools:
                await each.close()
            await verifier.aclose()

    app = Litestar(
        route_handlers=[
            create_task,
            edit_task,
            complete_task,
            reopen_task,
            delete_task,
            restore_task,
            list_tasks,
            get_task,
            task_history,
            list_events,
            stream_events,
            health,
            ready,
            metrics,
        ],
        middleware=[DefineMiddleware(JWTAuth, exclude=["^/schema"])],
        exception_handlers={
            Problem: _on_problem,
            HTTPException: _on_http_exception,
            psycopg.OperationalError: _on_database_down,
            PoolTimeout: _on_database_down,
            psycopg.errors.UndefinedTable: _on_not_migrated,
            psycopg.errors.UndefinedColumn: _on_not_migrated,
            psycopg.errors.UndefinedFunction: _on_not_migrated,
            Exception: _on_unexpected,
        },
        lifespan=[lifespan],
        request_max_body_size=MAX_BODY,
        openapi_config=OpenAPIConfig(
            title="todo-cqrs",
            version=__version__,
            path="/schema",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")
                }
            ),
            security=[{"bearer": []}],
        ),
        state=State(
            {
                "settings": settings,
                "pool": pool,
                "router": router,
                "signal": signal,
                "verifier": verifier,
            }
        ),
        logging_config=None,
    )
    return ServiceEdge(app, settings.request_timeout)
