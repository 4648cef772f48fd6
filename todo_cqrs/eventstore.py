"""The append-only event table: appending a command's events and reading them back."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from datetime import datetime
from typing import Any, NamedTuple, cast
from uuid import UUID

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from todo_cqrs.domain import EVENT_TYPES, BrokenStream, Event, Recorded, event_data, event_type

Conn = psycopg.AsyncConnection[Any]


class EventMeta(msgspec.Struct):
    """What caused an event: the request that carried the command."""

    request_id: str | None
    idempotency_key: str | None


class StoredEvent(msgspec.Struct):
    """An event as history and the feed show it."""

    position: int
    task_id: UUID
    version: int
    type: str
    data: msgspec.Raw
    occurred_at: datetime
    meta: EventMeta


_encode = msgspec.json.Encoder().encode
log = logging.getLogger("todo_cqrs.eventstore")

CHANNEL = "todo_events"  # NOTIFY payload: the user id whose events just committed

# --- event shapes over time ---------------------------------------------------------------
#
# Each stored event carries the schema version of its `data`. When a shape changes, its
# version goes up here and an upcaster from the old version is added; events are never
# rewritten, they are upcast when read, so history, time travel and the rebuild all see
# the current structs.

SCHEMA_VERSIONS: dict[str, int] = {name: 1 for name in EVENT_TYPES} | {"TaskCreated": 2}

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _task_created_v1(data: dict[str, Any]) -> dict[str, Any]:
    # Version 1 (before the first release) had no due dates and no tags.
    return {**data, "due_date": None, "tags": []}


UPCASTERS: dict[tuple[str, int], Upcaster] = {("TaskCreated", 1): _task_created_v1}


def upcast(type_name: str, data: dict[str, Any], schema_version: int) -> Event:
    """An event's stored `data` of any schema version as the current struct."""
    for version in range(schema_version, SCHEMA_VERSIONS[type_name]):
        data = UPCASTERS[(type_name, version)](data)
    return msgspec.convert(data, EVENT_TYPES[type_name])


def decode_event(type_name: str, data: str | bytes, schema_version: int | None = None) -> Event:
    """The stored `data` of an event as the current struct, upcast when it is older."""
    if schema_version is None or schema_version == SCHEMA_VERSIONS[type_name]:
        return msgspec.json.decode(data, type=EVENT_TYPES[type_name])
    return upcast(type_name, msgspec.json.decode(data), schema_version)


# A command's events, in version order so that their positions are in that order too. One
# command's events share the task, the time and the request; the rest comes as one JSON
# array (`new_events_json`).
_APPEND_EVENTS = (
    "INSERT INTO events (user_id, task_id, version, type, data, schema_version, occurred_at,"
    " request_id, idempotency_key)"
    " SELECT %(user_id)s, %(task_id)s, e.version, e.type, e.data, e.schema_version,"
    " %(occurred_at)s, %(request_id)s, %(idempotency_key)s"
    " FROM {after}, jsonb_to_recordset(%(events)s::jsonb)"
    " AS e(version int4, type text, data jsonb, schema_version int4) ORDER BY e.version"
)


def append_events_sql(after: str) -> str:
    """A command's event insert, for a CTE: it joins the CTE `after` (the command's written
    row), so no event is appended when the row was not written."""
    return _APPEND_EVENTS.format(after=after)


class _NewEvent(msgspec.Struct):
    version: int
    type: str
    data: dict[str, object]
    schema_version: int


def new_events_json(events: list[Recorded]) -> str:
    """The `events` parameter of `append_events_sql`."""
    return _encode(
        [
            _NewEvent(
                version=r.version,
                type=event_type(r.event),
                data=event_data(r.event),
                schema_version=SCHEMA_VERSIONS[event_type(r.event)],
            )
            for r in events
        ]
    ).decode()


# A page of history or of the feed stops once it holds PAGE_BYTES of event data (as JSON
# text): it ends with the event that reaches the limit, so it holds at most PAGE_BYTES plus
# one event, and always one event. Events run to 10,000 characters of description, which
# JSON can escape to 60 KB, so a page of 1,000 such events would hold 60 MB in the worker
# three times over (the server's answer, its strings, the response body). A page cut short
# says that more follows (`StoredEvents.more`); clients page on until the end as they
# always do.
PAGE_BYTES = 1 << 20

# A page of a user's events in `order`, cut after `limit` events or once PAGE_BYTES of data
# is reached. The cut sums each event's stored size (`data_bytes`, migration 0005) and turns
# into text only the events kept: a user's 1,000 events of 60 KB made every page turn all
# `limit` + 1 of them and keep 17 (0.5 s of the server's time at limit=1000). `followed`
# says whether another event follows a row among those read, so that a page cut by the
# bytes knows more follow too. Both windows need only the rows up to the current one and
# the next, so the server streams them rather than holding the page.
_PAGE = (
    "SELECT position, task_id, version, type, data::text, schema_version, occurred_at,"
    " request_id, idempotency_key, followed FROM (SELECT *,"
    " lead({order}) OVER (ORDER BY {order}) IS NOT NULL AS followed,"
    " sum(data_bytes) OVER (ORDER BY {order}) - data_bytes AS before"
    " FROM (SELECT position, task_id, version, type, data, data_bytes, schema_version,"
    " occurred_at, request_id, idempotency_key FROM events"
    " WHERE user_id = %(user_id)s AND {where}"
    " ORDER BY {order} LIMIT %(limit)s + 1) AS page) AS sized"
    " WHERE before < %(page_bytes)s ORDER BY {order}"
)
TASK_HISTORY = _PAGE.format(
    where="task_id = %(task_id)s AND version > %(after)s",
    order="version",
)
USER_EVENTS = _PAGE.format(where="position > %(after)s", order="position")


class StoredEvents(NamedTuple):
    items: list[StoredEvent]
    more: bool  # whether events follow the page's last one


def _stored_event(row: tuple[Any, ...]) -> StoredEvent:
    type_name, data, schema_version = row[3], row[4], row[5]
    if schema_version == SCHEMA_VERSIONS[type_name]:
        raw = data.encode()
    else:
        raw = _encode(event_data(decode_event(type_name, data, schema_version)))
    return StoredEvent(
        position=row[0],
        task_id=row[1],
        version=row[2],
        type=type_name,
        data=msgspec.Raw(raw),
        occurred_at=row[6],
        meta=EventMeta(request_id=row[7], idempotency_key=row[8]),
    )


async def _event_page(conn: Conn, query: str, params: dict[str, Any], limit: int) -> StoredEvents:
    cur = await conn.execute(query, {**params, "limit": limit, "page_bytes": PAGE_BYTES})
    rows = await cur.fetchall()
    items = [_stored_event(row) for row in rows[:limit]]
    return StoredEvents(items, more=bool(items) and bool(rows[len(items) - 1][9]))


async def task_history(
    conn: Conn, user_id: str, task_id: UUID, after_version: int, limit: int
) -> StoredEvents:
    """The task's events after a version, in version order."""
    params = {"user_id": user_id, "task_id": task_id, "after": after_version}
    return await _event_page(conn, TASK_HISTORY, params, limit)


async def user_events(conn: Conn, user_id: str, after: int, limit: int) -> StoredEvents:
    """The user's events after a position, in position order, which is their commit order
    (see commands.py: a user's events are appended under the user's lock)."""
    return await _event_page(conn, USER_EVENTS, {"user_id": user_id, "after": after}, limit)


# Rows per chunk of a task's events: a task has as many events as it was changed, each up
# to 60 KB of data, and a fold needs only one chunk at a time. Four clients folding a task
# of 2,000 such events: peak RSS 628 MB read whole, 122 MB in chunks of 100, 82 MB of 20.
TASK_EVENTS_CHUNK = 20

# The server sends rows in chunks only with libpq 17 or newer (psycopg's binary wheels 3.3
# and later ship it); an older libpq streams row by row, which holds as little.
_STREAM_ROWS = TASK_EVENTS_CHUNK if psycopg.capabilities.has_stream_chunked() else 1


async def task_events(
    conn: Conn,
    user_id: str,
    task_id: UUID,
    *,
    up_to_version: int | None = None,
    up_to_time: datetime | None = None,
) -> AsyncGenerator[list[Recorded], None]:
    """The task's events in version order, up to a version or a moment (inclusive), in
    chunks of TASK_EVENTS_CHUNK, streamed from the server rather than read whole.

    Use it inside `contextlib.aclosing`: a stream left early (an event that cannot be
    decoded, say) must end its query before the connection goes back to the pool."""
    chunk: list[Recorded] = []
    # psycopg types stream() as an AsyncIterator; it is an async generator, whose aclose()
    # cancels the query and drains what the server already sent.
    rows = cast(
        "AsyncGenerator[tuple[Any, ...], None]",
        conn.cursor().stream(
            "SELECT version, type, data::text, schema_version, occurred_at FROM events"
            " WHERE user_id = %s AND task_id = %s"
            " AND (%s::integer IS NULL OR version <= %s::integer)"
            " AND (%s::timestamptz IS NULL OR occurred_at <= %s::timestamptz)"
            " ORDER BY version",
            (user_id, task_id, up_to_version, up_to_version, up_to_time, up_to_time),
            size=_STREAM_ROWS,
        ),
    )
    async with aclosing(rows):
        async for version, type_name, data, schema_version, occurred_at in rows:
            event = decode_event(type_name, data, schema_version)
            chunk.append(Recorded(task_id, version, occurred_at, event))
            if len(chunk) == TASK_EVENTS_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


async def task_exists(conn: Conn, user_id: str, task_id: UUID) -> bool:
    """Whether the user ever created this task (deleted or not)."""
    cur = await conn.execute(
        "SELECT 1 FROM events WHERE user_id = %s AND task_id = %s AND version = 1",
        (user_id, task_id),
    )
    return await cur.fetchone() is not None


# Serialises a user's appends until the transaction ends (parameter `user_id`). Every
# command of a user holds it from before its events draw their positions until it commits,
# so a user's positions become visible in increasing order: a reader of `position > P`
# never steps over an event that commits later.
LOCK_USER = "SELECT pg_advisory_xact_lock(hashtextextended(%(user_id)s, 0))"


async def lock_user(conn: Conn, user_id: str) -> None:
    """Take the user's append lock (LOCK_USER) for the rest of this transaction."""
    await conn.execute(LOCK_USER, {"user_id": user_id})


def _all_current_sql() -> str:
    """SQL that is true when an event's stored shape is the current one for its type."""
    cases = " ".join(f"WHEN '{name}' THEN {version}" for name, version in SCHEMA_VERSIONS.items())
    return f"schema_version = CASE type {cases} END"


_CURRENT_STREAM = msgspec.json.Decoder(list[Recorded])
_OLD_STREAM = msgspec.json.Decoder(list[tuple[UUID, int, datetime, dict[str, Any], int]])


# Events per row of the rebuild's COPY: a task's events come as one JSON array per this many,
# so that a task changed thousands of times with 60 KB events is not one row of hundreds of
# MB in the server and in Python (PostgreSQL refuses a value past 1 GB: 17,000 such events);
# an array of 100 holds 6 MB at most. Most tasks have a few events, and one array.
REBUILD_EVENTS_PER_ROW = 100


async def copy_task_streams(
    conn: Conn, *, user_id: str | None = None, c_order: bool = False
) -> AsyncGenerator[tuple[str, list[Recorded]], None]:
    """Every task's events, task by task (ordered by user and task), for the rebuild; a task
    of more than REBUILD_EVENTS_PER_ROW events comes as several lists in a row, in order.

    The server aggregates a task's events into JSON arrays, tag included, and streams them
    with COPY; msgspec then decodes a whole array into `Recorded`s in one call. That keeps
    Python's work per event small and lets the server work on the other core. An array
    holding an old shape goes through the upcasters. `c_order` sorts users in byte order,
    as Python compares strings, for merging with another stream.
    """
    condition, params = ("WHERE user_id = %s", [user_id]) if user_id is not None else ("", [])
    collate = ' COLLATE "C"' if c_order else ""
    part = f"(version - 1) / {REBUILD_EVENTS_PER_ROW}"
    query = (
        "COPY (SELECT user_id, json_agg(json_build_array(task_id, version, occurred_at,"
        " data || jsonb_build_object('type', type), schema_version) ORDER BY version),"
        f" bool_and({_all_current_sql()}) FROM events {condition}"
        f" GROUP BY user_id, task_id, {part} ORDER BY user_id{collate}, task_id, {part})"
        " TO STDOUT"
    )
    async with conn.cursor() as cur, cur.copy(query, params) as copy:
        copy.set_types(["text", "text", "bool"])
        async for user, stream, current in copy.rows():
            try:
                if current:
                    events = _CURRENT_STREAM.decode(stream)
                else:
                    events = [
                        Recorded(
                            task_id, version, at, upcast(data.pop("type"), data, schema_version)
                        )
                        for task_id, version, at, data, schema_version in _OLD_STREAM.decode(stream)
                    ]
            except (msgspec.DecodeError, KeyError) as error:
                # The row is the server's own JSON: its first event names the task.
                task = msgspec.json.decode(stream)[0][0]
                what = f"unknown type {error}" if isinstance(error, KeyError) else str(error)
                raise BrokenStream(f"an event of task {task} does not decode: {what}") from error
            yield user, events


# A stream's user is registered in `event_listeners` (migration 0006) for this long, and the
# registrations of the users a process streams to are renewed every third of it.
LISTENER_TTL = 90.0

_RENEW_LISTENERS = (
    "INSERT INTO event_listeners (user_id, listener, expires_at)"
    " SELECT user_id, %(listener)s, now() + make_interval(secs => %(ttl)s)"
    " FROM unnest(%(users)s::text[]) AS u(user_id)"
    " ON CONFLICT (user_id, listener) DO UPDATE SET expires_at = excluded.expires_at"
)
# The registration takes the user's append lock as well, and the stream reads only after it:
# a command that held the lock before has committed by then (and the read sees its events),
# and one that takes it after finds the row committed (and notifies).
_REGISTER_LISTENER = (
    f"WITH registered AS ({_RENEW_LISTENERS} RETURNING 1) {LOCK_USER} FROM registered"
)
_FORGET_LISTENER = (
    "DELETE FROM event_listeners WHERE user_id = %(user_id)s AND listener = %(listener)s"
)
_FORGET_PROCESS = "DELETE FROM event_listeners WHERE listener = %(listener)s"


class NewEventSignal:
    """One LISTEN connection per process that wakes the streams waiting on a user's events.

    A stream subscribes, reads what is new, clears its flag and waits; a notification
    sets the flag. After the connection is lost and found again every stream is woken,
    since notifications sent in between are gone; streams re-read on each heartbeat too.

    Commands notify only for users that some process streams to (`event_listeners`): each
    process registers the users of its open streams, renews them (`renew`, from the app's
    housekeeping) and forgets a user when its last stream here closes.
    """

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.waiting: dict[str, set[asyncio.Event]] = {}
        self.listener = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # The forgets under way, by the user each forgets.
        self._forgetting: dict[asyncio.Task[None], str] = {}

    def subscribe(self, user_id: str) -> asyncio.Event:
        flag = asyncio.Event()
        self.waiting.setdefault(user_id, set()).add(flag)
        return flag

    async def register(self, pool: AsyncConnectionPool, user_id: str) -> None:
        """Make commands notify for the user (a subscribed one); from when this returns, a
        read of the feed sees every event of the user that was committed without notifying."""
        # A forget of the user still under way (its last stream here just closed) goes
        # first: its DELETE, sent before this upsert, may still run after it on the server
        # and take the new stream's row away until the next renewal.
        if forgetting := [task for task, user in self._forgetting.items() if user == user_id]:
            await asyncio.wait(forgetting)
        try:
            async with pool.connection() as conn:
                await conn.execute(
                    _REGISTER_LISTENER,
                    {
                        "user_id": user_id,
                        "users": [user_id],
                        "listener": self.listener,
                        "ttl": LISTENER_TTL,
                    },
                )
        except (psycopg.Error, PoolTimeout) as error:
            # The stream still works, a heartbeat late at worst; `renew` registers it later.
            log.warning("event stream could not register its user: %s", error)

    def unsubscribe(self, pool: AsyncConnectionPool, user_id: str, flag: asyncio.Event) -> None:
        flags = self.waiting.get(user_id)
        if flags is not None:
            flags.discard(flag)
            if not flags:
                del self.waiting[user_id]
                # In a task of its own: a stream ends by cancellation (its client left),
                # and anything it awaited from here would be cancelled as well.
                task = asyncio.get_running_loop().create_task(self._forget(pool, user_id))
                self._forgetting[task] = user_id
                task.add_done_callback(self._forgetting.pop)

    async def _forget(self, pool: AsyncConnectionPool, user_id: str) -> None:
        try:
            async with pool.connection() as conn:
                if user_id not in self.waiting:  # no new stream of the user meanwhile
                    await conn.execute(
                        _FORGET_LISTENER, {"user_id": user_id, "listener": self.listener}
                    )
        except (psycopg.Error, PoolTimeout) as error:
            log.warning("could not forget a closed stream's user (it expires): %s", error)

    async def renew(self, pool: AsyncConnectionPool) -> None:
        """Renew the registrations of the users streamed to here (and make any that failed)."""
        if self.waiting:
            async with pool.connection() as conn:
                await conn.execute(
                    _RENEW_LISTENERS,
                    {"users": list(self.waiting), "listener": self.listener, "ttl": LISTENER_TTL},
                )

    async def close(self, pool: AsyncConnectionPool) -> None:
        """At shutdown, before the pool closes: forget every user registered by this process
        (its streams are over), rather than leave the rows to expire."""
        if self._forgetting:
            await asyncio.wait(list(self._forgetting), timeout=2)
        try:
            async with pool.connection(timeout=2) as conn:
                await conn.execute(_FORGET_PROCESS, {"listener": self.listener})
        except (psycopg.Error, PoolTimeout) as error:
            log.warning("could not forget this process's stream registrations: %s", error)

    def _wake_all(self) -> None:
        for flags in self.waiting.values():
            for flag in flags:
                flag.set()

    async def run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._wake_all()
                    async for note in conn.notifies():
                        for flag in self.waiting.get(note.payload, ()):
                            flag.set()
            except psycopg.Error as error:
                log.warning("event listener lost its connection: %s", error)
            self._wake_all()
            await asyncio.sleep(1)


async def prune_listeners(pool: AsyncConnectionPool) -> int:
    """Forget the registrations that expired (of processes that died)."""
    async with pool.connection() as conn:
        cur = await conn.execute("DELETE FROM event_listeners WHERE expires_at < now()")
        return cur.rowcount
