"""The projection row carries the task's JSON as the API shows it (`body`).

Queries send it as it is, instead of loading each column into Python and encoding it again:
a page of 50 tasks costs the service a third fewer instructions (BENCHMARKS.md). Rows that
exist already get theirs here, from the same encoder that commands and the rebuild use.
"""

from typing import Any

from yoyo import step

__depends__ = {"0002.events-position-index"}


def add_task_bodies(conn: Any) -> None:
    from todo_cqrs.projection import add_task_bodies

    add_task_bodies(conn)


steps = [step(add_task_bodies, "ALTER TABLE tasks DROP COLUMN body")]
