"""The read side: plain SQL over the projection (and the event table for history)."""

from __future__ import annotations

import base64
import binascii
from contextlib import aclosing
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, TypeAlias
from uuid import UUID

import msgspec

from todo_cqrs import eventstore
from todo_cqrs.db import Connections
from todo_cqrs.domain import Task, caseless, fold
from todo_cqrs.eventstore import StoredEvent
from todo_cqrs.problems import bad_parameter, not_found

if TYPE_CHECKING:
    TaskView: TypeAlias = Task
else:
    # A task as the API shows it, for the OpenAPI document: Task without `deleted`, which a
    # task that is shown never has (Task's omit_defaults keeps it out of the JSON).
    TaskView = msgspec.defstruct(
        "Task",
        [(f.name, f.type) for f in msgspec.structs.fields(Task) if f.name != "deleted"],
        module=__name__,
    )


class TaskPage(msgspec.Struct):
    """A page of `GET /tasks`, as the OpenAPI schema shows it; `list_tasks` builds its JSON
    as `_StoredTaskPage`."""

    items: list[TaskView]
    next_cursor: str | None


class _StoredTaskPage(msgspec.Struct):
    items: list[msgspec.Raw]  # the rows' `body`: each task's JSON as the API shows it
    next_cursor: str | None


class _Position(msgspec.Struct):
    """Where a task stands in the list's order: its cursor."""

    created_at: datetime
    id: UUID


class TaskJson(NamedTuple):
    """A task as the API shows it: its JSON, ready to send, and its version (the ETag)."""

    version: int
    json: bytes


class EventPage(msgspec.Struct):
    items: list[StoredEvent]
    next_cursor: str | None


class TaskFilters(msgspec.Struct, frozen=True):
    completed: bool | None = None
    tag: str | None = None
    q: str | None = None
    due_before: date | None = None


# Cursors are opaque to clients: base64url of a small JSON array, checked when read back.


def _encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(value)).rstrip(b"=").decode()


# What the cursors hold: a task list's last (created_at, id), always with its UTC offset; a
# history's last version, 1 or more. A well-formed cursor of another shape was not handed
# out here, and is refused like a malformed one.
_ListCursor = tuple[Annotated[datetime, msgspec.Meta(tz=True)], UUID]
_HistoryCursor = tuple[Annotated[int, msgspec.Meta(ge=1)]]


def _decode_cursor(cursor: str, type_: Any) -> Any:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return msgspec.json.decode(raw, type=type_)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise bad_parameter("cursor", "is not one this service handed out") from None


_encode = msgspec.json.Encoder().encode
# The rows' `body` is the JSON that commands answer with and the rebuild writes: queries send
# it as it is, with no Task made from the columns and encoded again (a third of a page's
# instructions; BENCHMARKS.md).
GET_TASK = (
    "SELECT version, body FROM tasks WHERE user_id = %(user_id)s AND task_id = %(task_id)s"
    " AND NOT deleted"
)
LIST_TASKS = (
    "SELECT body FROM tasks WHERE user_id = %(user_id)s AND NOT deleted{where}"
    " ORDER BY created_at DESC, task_id DESC LIMIT %(limit)s"
)


async def get_task(source: Connections, user_id: str, task_id: UUID) -> TaskJson:
    async with source.connection() as conn:
        cur = await conn.execute(GET_TASK, {"user_id": user_id, "task_id": task_id})
        row = await cur.fetchone()
    if row is None:
        raise not_found()
    return TaskJson(row[0], row[1].encode())


async def list_tasks(
    source: Connections,
    user_id: str,
    filters: TaskFilters,
    limit: int,
    cursor: str | None,
) -> bytes:
    """A `TaskPage`'s JSON: newest first (created_at, then id, descending), keyset-paginated.

    Only the filters that were given go into the SQL, so each combination gets a plan
    of its own on the (user_id, created_at, task_id) index.
    """
    where: list[str] = []  # beyond the user and NOT deleted
    params: dict[str, Any] = {"user_id": user_id, "limit": limit + 1}
    if filters.completed is not None:
        where.append("completed = %(completed)s")
        params["completed"] = filters.completed
    if filters.tag is not None:
        where.append("tags @> ARRAY[%(tag)s::text]")
        params["tag"] = filters.tag
    if filters.q is not None:
        # strpos, not LIKE: % and _ in the search text are plain characters. The row keeps
        # its title as `caseless` makes it (projection.save_params).
        where.append("strpos(title_casefolded, %(q)s) > 0")
        params["q"] = caseless(filters.q)
    if filters.due_before is not None:
        where.append("due_date < %(due_before)s")
        params["due_before"] = filters.due_before
    if cursor is not None:
        created_at, last_id = _decode_cursor(cursor, _ListCursor)
        where.append("(created_at, task_id) < (%(created_at)s, %(last_id)s)")
        params["created_at"], params["last_id"] = created_at, last_id
    async with source.connection() as conn:
        cur = await conn.execute(
            LIST_TASKS.format(where="".join(f" AND {condition}" for condition in where)), params
        )
        rows = await cur.fetchall()
    next_cursor = None
    if len(rows) > limit:
        last = msgspec.json.decode(rows[limit - 1][0], type=_Position)
        next_cursor = _encode_cursor([last.created_at, last.id])
    items = [msgspec.Raw(row[0]) for row in rows[:limit]]
    return _encode(_StoredTaskPage(items=items, next_cursor=next_cursor))


async def task_history(
    source: Connections, user_id: str, task_id: UUID, limit: int, cursor: str | None
) -> EventPage:
    """The task's events oldest first; deleted tasks keep their history."""
    after = 0 if cursor is None else _decode_cursor(cursor, _HistoryCursor)[0]
    async with source.connection() as conn:
        items, more = await eventstore.task_history(conn, user_id, task_id, after, limit)
        if not items and not await eventstore.task_exists(conn, user_id, task_id):
            raise not_found()
    next_cursor = _encode_cursor([items[-1].version]) if more else None
    return EventPage(items=items, next_cursor=next_cursor)


class FeedPage(msgspec.Struct):
    items: list[StoredEvent]
    next_position: int


async def task_at(
    source: Connections,
    user_id: str,
    task_id: UUID,
    *,
    version: int | None = None,
    as_of: datetime | None = None,
) -> TaskJson:
    """Time travel: the task folded from its events up to a version or a moment.

    404 when it did not exist then, was deleted then, or the version is past the current one.
    """
    task = None
    async with source.connection() as conn:
        chunks = eventstore.task_events(
            conn, user_id, task_id, up_to_version=version, up_to_time=as_of
        )
        async with aclosing(chunks):
            async for events in chunks:
                task = fold(events, task)
    if task is None or task.deleted or (version is not None and task.version != version):
        raise not_found()
    return TaskJson(task.version, _encode(task))


async def user_events(
    source: Connections, user_id: str, after: int, limit: int
) -> tuple[FeedPage, bool]:
    """The feed: the user's events after a position, in commit order, none ever skipped;
    and whether more events follow the page (one cut short by PAGE_BYTES, say)."""
    async with source.connection() as conn:
        items, more = await eventstore.user_events(conn, user_id, after, limit)
    return FeedPage(items=items, next_position=items[-1].position if items else after), more


async def last_position(source: Connections, user_id: str) -> int:
    """The position of the user's newest event (0 for none): where a new stream starts."""
    async with source.connection() as conn:
        cur = await conn.execute(
            "SELECT coalesce(max(position), 0) FROM events WHERE user_id = %s", (user_id,)
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0
