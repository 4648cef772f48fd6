"""A synthetic data set made directly in the database, for benchmarks of the rebuild and the API.

Users `bench-user-0` ... each own tasks whose streams cycle through every event type, in
current shapes. Only events are written: `todo-cqrs rebuild` makes the projection from them.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg

# Version k of every task is event KINDS[(k - 2) % len(KINDS)] for k >= 2; version 1 creates it.
_KINDS = [
    ("TaskRenamed", "jsonb_build_object('title', 'Task ' || t || ' v' || v)"),
    (
        "TaskPriorityChanged",
        "jsonb_build_object('priority', (ARRAY['low','medium','high'])[1 + (t + v) %% 3])",
    ),
    (
        "TaskTagsChanged",
        "jsonb_build_object('tags', jsonb_build_array('tag' || (t %% 50), 'v' || v))",
    ),
    ("TaskCompleted", "'{}'::jsonb"),
    ("TaskDescriptionChanged", "jsonb_build_object('description', repeat('d', 20 + v))"),
    ("TaskReopened", "'{}'::jsonb"),
    (
        "TaskDueDateChanged",
        "jsonb_build_object('due_date',"
        " to_char(date '2027-01-01' + (t %% 365)::integer, 'YYYY-MM-DD'))",
    ),
]

_CREATED = (
    "jsonb_build_object('title', 'Task ' || t, 'description', '', 'priority', 'medium',"
    " 'due_date', NULL, 'tags', jsonb_build_array('tag' || (t %% 50)))"
)


def _event_sql(users: int, events_per_task: int) -> str:
    type_case = " ".join(f"WHEN {i} THEN '{name}'" for i, (name, _) in enumerate(_KINDS))
    data_case = " ".join(f"WHEN {i} THEN {data}" for i, (_, data) in enumerate(_KINDS))
    kind = f"(v - 2) %% {len(_KINDS)}"
    return f"""
        INSERT INTO events (user_id, task_id, version, type, data, schema_version, occurred_at)
        SELECT 'bench-user-' || (t %% {users}),
               md5('bench-task-' || t)::uuid,
               v,
               CASE WHEN v = 1 THEN 'TaskCreated' ELSE CASE {kind} {type_case} END END,
               CASE WHEN v = 1 THEN {_CREATED} ELSE CASE {kind} {data_case} END END,
               CASE WHEN v = 1 THEN 2 ELSE 1 END,
               timestamptz '2026-01-01 00:00:00Z' + t * interval '1 second' + v * interval '1 ms'
        FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS t,
             generate_series(1, {events_per_task}) AS v
        ORDER BY t, v
    """


def generate(
    conninfo: str,
    *,
    users: int,
    tasks: int,
    events: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
    chunk: int = 50_000,
) -> None:
    """Append `events` events over `tasks` tasks of `users` users (events // tasks each)."""
    events_per_task = max(1, events // tasks)
    sql = _event_sql(users, events_per_task)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for first in range(1, tasks + 1, chunk):
            last = min(tasks, first + chunk - 1)
            conn.execute(sql, {"first": first, "last": last})
            progress(last * events_per_task, tasks * events_per_task)
