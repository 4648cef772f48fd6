"""The projection row carries the task's JSON as the API shows it (`body`).

Queries send it as it is, instead of loading each column into Python and encoding it again:
a page of 50 tasks costs the service a third fewer instructions (BENCHMARKS.md). Rows that
exist already get theirs here, encoded as `todo_cqrs.domain.Task` was when this migration
was written (frozen below, so that a later change to Task cannot change what this migration
does), in the migration's transaction: 25 s for a million tasks on the benchmark machine,
while commands and queries wait.
"""

from datetime import date, datetime
from typing import Any, Literal
from uuid import UUID

import msgspec
from yoyo import step

__depends__ = {"0002.events-position-index"}


class _Task(msgspec.Struct, omit_defaults=True):
    """todo_cqrs.domain.Task as of this migration: the same fields, in the same order."""

    id: UUID
    title: str
    description: str
    completed: bool
    priority: Literal["low", "medium", "high"]
    due_date: date | None
    tags: list[str]
    version: int
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    deleted: bool = False


_COLUMNS = (
    "task_id, title, description, completed, priority, due_date, tags, version,"
    " created_at, updated_at, completed_at, deleted"
)


def add_task_bodies(conn: Any) -> None:
    conn.execute("SET LOCAL TimeZone TO 'UTC'")  # the JSON shows times with Z
    conn.execute("ALTER TABLE tasks ADD COLUMN body text")
    conn.execute(
        "CREATE TEMPORARY TABLE task_bodies (user_id text, task_id uuid, body text) ON COMMIT DROP"
    )
    encode = msgspec.json.Encoder().encode
    with conn.cursor(name="task_rows") as rows, conn.cursor() as cur:
        rows.execute(f"SELECT user_id, {_COLUMNS} FROM tasks")
        while batch := rows.fetchmany(10_000):  # no FETCH while a COPY is open: in turns
            with cur.copy("COPY task_bodies FROM STDIN") as copy:
                for row in batch:
                    copy.write_row((row[0], row[1], encode(_Task(*row[1:])).decode()))
    conn.execute(
        "UPDATE tasks SET body = b.body FROM task_bodies b"
        " WHERE tasks.user_id = b.user_id AND tasks.task_id = b.task_id"
    )
    conn.execute("ALTER TABLE tasks ALTER COLUMN body SET NOT NULL")


steps = [step(add_task_bodies, "ALTER TABLE tasks DROP COLUMN body")]
