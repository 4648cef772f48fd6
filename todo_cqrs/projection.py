"""The read projection: one row per task, written by commands and by the rebuild."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import psycopg

from todo_cqrs.domain import Task, evolve
from todo_cqrs.eventstore import all_streams

Conn = psycopg.AsyncConnection[Any]

# The columns of a task row, in the order that `task_from_row` reads them.
TASK_COLUMNS = (
    "task_id, title, description, completed, priority, due_date, tags, version,"
    " created_at, updated_at, completed_at, deleted"
)
_COLUMN_NAMES = [c.strip() for c in TASK_COLUMNS.split(",")]


def task_from_row(row: tuple[Any, ...]) -> Task:
    return Task(
        id=row[0],
        title=row[1],
        description=row[2],
        completed=row[3],
        priority=row[4],
        due_date=row[5],
        tags=row[6],
        version=row[7],
        created_at=row[8],
        updated_at=row[9],
        completed_at=row[10],
        deleted=row[11],
    )


def _row_values(user_id: str, task: Task) -> tuple[Any, ...]:
    return (
        user_id,
        task.id,
        task.title,
        task.description,
        task.completed,
        task.priority,
        task.due_date,
        task.tags,
        task.version,
        task.created_at,
        task.updated_at,
        task.completed_at,
        task.deleted,
    )


async def load_task(conn: Conn, user_id: str, task_id: UUID) -> Task | None:
    """The task's current state, deleted or not; the caller holds the user's lock."""
    cur = await conn.execute(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE user_id = %s AND task_id = %s",
        (user_id, task_id),
    )
    row = await cur.fetchone()
    return task_from_row(row) if row else None


_SAVE = (
    f"INSERT INTO tasks (user_id, {TASK_COLUMNS}) VALUES ({', '.join(['%s'] * 13)})"
    " ON CONFLICT (user_id, task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMN_NAMES[1:])
)


async def save_task(conn: Conn, user_id: str, task: Task) -> None:
    await conn.execute(_SAVE, _row_values(user_id, task))


Progress = Callable[[int, int], None]


def _print_progress(events: int, tasks: int) -> None:
    print(f"rebuild: {events} events, {tasks} tasks", file=sys.stderr, flush=True)


async def _copy_rows(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    async with (
        conn.cursor() as cur,
        cur.copy(f"COPY tasks (user_id, {TASK_COLUMNS}) FROM STDIN") as copy,
    ):
        for row in rows:
            await copy.write_row(row)
    rows.clear()


async def rebuild(conn: Conn, progress: Progress = _print_progress) -> tuple[int, int]:
    """Replace the whole projection with a fold of the event table, in one transaction.

    Commands wait while it runs (it holds an EXCLUSIVE lock on `tasks`); queries keep
    reading the old projection until the new one commits, so none sees a half-built one.
    Returns (events, tasks).
    """
    events = tasks = 0
    rows: list[tuple[Any, ...]] = []
    async with conn.transaction():
        await conn.execute("LOCK TABLE tasks IN EXCLUSIVE MODE")
        await conn.execute("DELETE FROM tasks")
        key: tuple[str, UUID] | None = None
        state: Task | None = None
        last_report = time.monotonic()
        # The cursor streams the events; finished tasks go out in COPY batches between fetches.
        async for user_id, recorded in all_streams(conn):
            if (user_id, recorded.task_id) != key:
                if key is not None and state is not None:
                    rows.append(_row_values(key[0], state))
                    tasks += 1
                    if len(rows) >= 5000:
                        await _copy_rows(conn, rows)
                key, state = (user_id, recorded.task_id), None
            state = evolve(state, recorded)
            events += 1
            if time.monotonic() - last_report > 2:
                progress(events, tasks)
                last_report = time.monotonic()
        if key is not None and state is not None:
            rows.append(_row_values(key[0], state))
            tasks += 1
        await _copy_rows(conn, rows)
    return events, tasks
