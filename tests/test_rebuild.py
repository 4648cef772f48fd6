"""The rebuild puts back a projection that equals the fold of the events (API.md, "Command
line": `todo-cqrs rebuild`; DESIGN.md, "The one idea").

The test database is shared by the whole run, so every check compares the whole `tasks`
table with a fold of the whole event table, made here with `domain.evolve`; only the
corruption is limited to this test's own users.
"""

from __future__ import annotations

import ast
import asyncio
import re
import threading
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
from helpers import (
    Key,
    differences,
    event_streams,
    fold_streams,
    projection_rows,
    run_cli,
    service_env,
)

from todo_cqrs import dataset, db, eventstore, projection
from todo_cqrs.domain import BrokenStream


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def workload(api: Any, other_api: Any) -> dict[str, list[uuid.UUID]]:
    """Commands of three users, deletes and restores included; their task ids by user."""
    third = type(api)(api.client, f"user-{uuid.uuid4()}")
    ann = [api.create(title=t, tags=["x"]) for t in ("one", "two", "three")]
    ok(api.patch(f"/tasks/{ann[0]['id']}", json={"title": "One", "priority": "high"}))
    ok(api.patch(f"/tasks/{ann[0]['id']}", json={"description": "with a description"}))
    ok(api.post(f"/tasks/{ann[1]['id']}/complete"))
    ok(api.post(f"/tasks/{ann[1]['id']}/reopen"))
    ok(api.post(f"/tasks/{ann[1]['id']}/complete"))
    ok(api.patch(f"/tasks/{ann[2]['id']}", json={"due_date": "2027-01-31"}))
    ok(api.delete(f"/tasks/{ann[2]['id']}"), 204)

    bob = [other_api.create(title=t) for t in ("four", "five")]
    ok(other_api.delete(f"/tasks/{bob[0]['id']}"), 204)
    ok(other_api.post(f"/tasks/{bob[0]['id']}/restore"))
    ok(other_api.patch(f"/tasks/{bob[0]['id']}", json={"tags": ["b", "a"], "completed": True}))
    ok(other_api.patch(f"/tasks/{bob[1]['id']}", json={"due_date": "2027-02-01"}))
    ok(other_api.patch(f"/tasks/{bob[1]['id']}", json={"due_date": None}))

    cyd = [third.create(title="six", description="deleted for good")]
    ok(third.delete(f"/tasks/{cyd[0]['id']}"), 204)

    return {
        user.user: [uuid.UUID(t["id"]) for t in tasks]
        for user, tasks in ((api, ann), (other_api, bob), (third, cyd))
    }


def corrupt(conn: psycopg.Connection[Any], tasks: dict[str, list[uuid.UUID]]) -> set[Key]:
    """Damage the projection rows of these users behind the service's back; the keys of
    the damaged rows (one deleted, one that has no events at all)."""
    (ann, a), (bob, b), (cyd, c) = tasks.items()
    edits = [
        (ann, a[0], "title = 'corrupted', version = version + 7"),
        (ann, a[1], "completed = NOT completed, completed_at = NULL"),
        (bob, b[0], "tags = '{zzz}', deleted = true"),
        (bob, b[1], "due_date = '2000-01-01', updated_at = updated_at - interval '1 day'"),
        (cyd, c[0], "deleted = false"),  # a deleted task comes back to life
    ]
    for user, task_id, change in edits:
        done = conn.execute(
            f"UPDATE tasks SET {change} WHERE user_id = %s AND task_id = %s", (user, task_id)
        )
        assert done.rowcount == 1
    gone = conn.execute("DELETE FROM tasks WHERE user_id = %s AND task_id = %s", (ann, a[2]))
    assert gone.rowcount == 1
    phantom = uuid.uuid4()
    conn.execute(
        "INSERT INTO tasks SELECT user_id, %s, 'no events', description, completed, priority,"
        " due_date, tags, 1, created_at, updated_at, completed_at, deleted, body, 'no events'"
        " FROM tasks"
        " WHERE user_id = %s AND task_id = %s",
        (phantom, bob, b[1]),
    )
    return {(ann, a[0]), (ann, a[1]), (bob, b[0]), (bob, b[1]), (cyd, c[0]), (ann, a[2]),
            (bob, phantom)}  # fmt: skip


def mine(found: dict[Key, str], tasks: dict[str, list[uuid.UUID]]) -> set[Key]:
    return {key for key in found if key[0] in tasks}


def assert_projection_is_the_fold(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """The whole table equals the fold of the whole event table; (events, task streams)."""
    streams = event_streams(conn)
    assert differences(projection_rows(conn), fold_streams(streams)) == {}
    rows = conn.execute("SELECT count(*) FROM tasks").fetchone()
    assert rows is not None and rows[0] == len(streams)
    # and the rebuild's work table did not outlive it
    assert conn.execute("SELECT to_regclass('tasks_rebuild')").fetchone() == (None,)
    return sum(len(s) for s in streams.values()), len(streams)


def test_rebuild_in_process_repairs_the_projection(
    api: Any, other_api: Any, database_url: str
) -> None:
    tasks = workload(api, other_api)
    with psycopg.connect(database_url, autocommit=True) as conn:
        users = list(tasks)
        before = {k: v for k, v in projection_rows(conn).items() if k[0] in users}
        streams = {k: v for k, v in event_streams(conn).items() if k[0] in users}
        assert sorted(before) == sorted((u, t) for u in users for t in tasks[u])
        assert differences(before, fold_streams(streams)) == {}
        damaged = corrupt(conn, tasks)
        assert (
            mine(
                differences(
                    projection_rows(conn, check_bodies=False), fold_streams(event_streams(conn))
                ),
                tasks,
            )
            == damaged
        )

    summary = asyncio.run(projection.rebuild_all(database_url))

    with psycopg.connect(database_url) as conn:
        events, streams_count = assert_projection_is_the_fold(conn)
        after = {k: v for k, v in projection_rows(conn).items() if k[0] in tasks}
    assert (summary.events, summary.tasks, summary.caught_up) == (events, streams_count, 0)
    assert after == before  # this test's rows are back exactly as the commands left them
    # and the service answers from the rebuilt table
    ok(api.get(f"/tasks/{tasks[api.user][0]}"))
    assert ok(api.get(f"/tasks/{tasks[api.user][2]}"), 404)["status"] == 404


REBUILT = re.compile(
    r"rebuilt ([\d,]+) tasks from ([\d,]+) events in \d+\.\d s"
    r" \([\d,]+ events/s; ([\d,]+) caught up while it ran\)\n"
)


def test_rebuild_command_repairs_the_projection(
    api: Any, other_api: Any, database_url: str
) -> None:
    tasks = workload(api, other_api)
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = {k: v for k, v in projection_rows(conn).items() if k[0] in tasks}
        corrupt(conn, tasks)

    env = service_env(DATABASE_URL=database_url)
    checked = run_cli("rebuild", "--check", "--quiet", env=env)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    reported = {
        (ast.literal_eval(user), uuid.UUID(task))
        for user, task in re.findall(
            r"^drift: user (.+?) task ([0-9a-f-]{36}): ", checked.stdout, re.M
        )
    }
    with psycopg.connect(database_url) as conn:
        damaged_rows = projection_rows(conn, check_bodies=False)
        expected = set(differences(damaged_rows, fold_streams(event_streams(conn))))
    assert reported == expected  # the service's own check agrees with this fold

    rebuilt = run_cli("rebuild", env=env, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    match = REBUILT.fullmatch(rebuilt.stdout)
    assert match, rebuilt.stdout
    with psycopg.connect(database_url) as conn:
        events, streams_count = assert_projection_is_the_fold(conn)
        after = {k: v for k, v in projection_rows(conn).items() if k[0] in tasks}
    numbers = tuple(int(n.replace(",", "")) for n in match.groups())
    assert numbers == (streams_count, events, 0)
    assert after == before

    clean = run_cli("rebuild", "--check", "--quiet", env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.endswith("no drift\n"), clean.stdout


def test_rebuild_of_one_user_touches_only_that_user(
    api: Any, other_api: Any, database_url: str
) -> None:
    tasks = workload(api, other_api)
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = {k: v for k, v in projection_rows(conn).items() if k[0] in tasks}
        damaged = corrupt(conn, tasks)
        corrupted = projection_rows(conn, check_bodies=False)

    summary = asyncio.run(projection.rebuild_user(database_url, api.user))

    with psycopg.connect(database_url) as conn:
        streams = event_streams(conn)
        rows = projection_rows(conn, check_bodies=False)  # the others' are still damaged
        projection_rows(conn, api.user)  # the rebuilt user's bodies are right
    ann = {k: v for k, v in streams.items() if k[0] == api.user}
    assert (summary.events, summary.tasks) == (sum(len(s) for s in ann.values()), len(ann))
    assert {k: v for k, v in rows.items() if k[0] == api.user} == {
        k: v for k, v in before.items() if k[0] == api.user
    }
    # Everybody else's rows are as they were, damage included.
    assert {k: v for k, v in rows.items() if k[0] != api.user} == {
        k: v for k, v in corrupted.items() if k[0] != api.user
    }
    assert mine(differences(rows, fold_streams(streams)), tasks) == {
        key for key in damaged if key[0] != api.user
    }

    # Leave the shared database whole for whoever comes next.
    asyncio.run(projection.rebuild_all(database_url))
    with psycopg.connect(database_url) as conn:
        assert_projection_is_the_fold(conn)


def test_tasks_longer_than_a_copy_row_fold_across_their_rows(api: Any, database_url: str) -> None:
    """The rebuild reads a task's events REBUILD_EVENTS_PER_ROW (100) to a row: two tasks
    of 2,501 events (26 rows each: the fold goes on across them) beside one of a single
    event, all of one user; the rebuild, the user's rebuild and --check all fold them whole."""
    assert eventstore.REBUILD_EVENTS_PER_ROW == 100
    long_ids = [api.create(title="long")["id"] for _ in range(2)]
    short_id = api.create(title="short")["id"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for task_id in long_ids:
            # Renames up to version 2,501, completed at 100 and reopened at 101 (the last
            # event of the first row and the first of the second).
            conn.execute(
                "INSERT INTO events (user_id, task_id, version, type, data, occurred_at)"
                " SELECT %(user)s, %(task)s, v,"
                " CASE v WHEN 100 THEN 'TaskCompleted' WHEN 101 THEN 'TaskReopened'"
                " ELSE 'TaskRenamed' END,"
                " CASE WHEN v IN (100, 101) THEN '{}'::jsonb"
                " ELSE jsonb_build_object('title', 'title ' || v) END,"
                " now() + v * interval '1 ms'"
                " FROM generate_series(2, 2501) AS v",
                {"user": api.user, "task": task_id},
            )
        streams = event_streams(conn, api.user)
        assert [len(streams[(api.user, uuid.UUID(t))]) for t in long_ids] == [2501, 2501]

    async def lists_per_task() -> dict[str, int]:
        counts: dict[str, int] = {}
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            async for _, events in eventstore.copy_task_streams(conn, user_id=api.user):
                key = str(events[0].task_id)
                counts[key] = counts.get(key, 0) + 1
        return counts

    # 2,501 events make 26 lists of at most 100; the single event, one.
    assert asyncio.run(lists_per_task()) == {long_ids[0]: 26, long_ids[1]: 26, short_id: 1}

    summary = asyncio.run(projection.rebuild_user(database_url, api.user))
    assert (summary.events, summary.tasks) == (5003, 3)
    with psycopg.connect(database_url) as conn:
        rows = projection_rows(conn, api.user)
        assert rows == fold_streams(event_streams(conn, api.user))
    for task_id in long_ids:
        task = ok(api.get(f"/tasks/{task_id}"))
        assert (task["title"], task["version"], task["completed"]) == ("title 2501", 2501, False)
    assert ok(api.get(f"/tasks/{short_id}"))["version"] == 1

    drifts = asyncio.run(projection.check(database_url))
    assert [d for d in drifts if d.user_id == api.user] == []
    asyncio.run(projection.rebuild_all(database_url))
    with psycopg.connect(database_url) as conn:
        assert projection_rows(conn, api.user) == rows
        assert_projection_is_the_fold(conn)


def _error_within(
    seconds: float, run: Callable[[], Coroutine[Any, Any, object]]
) -> BaseException | None:
    """What `run` raised, from a thread of its own, so that a run that never ends fails the
    test instead of holding up the suite."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(run())
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return raised[0] if raised else None


def test_a_stream_that_cannot_be_folded_fails_the_rebuild_and_check_without_hanging(
    server_url: str,
) -> None:
    """Events that no command writes (a rename before the task's TaskCreated, written by
    hand): the rebuilds and --check stop with the fold's error, naming the task, rather than
    wait for ever on a COPY they left open (the events' or, in --check, the rows' one, which
    is still under way halfway through 20,000 rows); the projection stays as it was. The
    command line says so in one line with exit status 4, for data that does not decode too."""
    url = db.create_database(server_url, "todo_cqrs_broken")
    try:
        db.migrate(url)
        dataset.generate(url, users=100, tasks=20_000, events=100_000)
        asyncio.run(projection.rebuild_all(url))
        user, task_id = "bench-user-50-broken", uuid.uuid4()  # halfway through the rows
        with psycopg.connect(url, autocommit=True) as conn:
            before = projection_rows(conn)
            conn.execute(
                "INSERT INTO events (user_id, task_id, version, type, data, occurred_at)"
                """ VALUES (%s, %s, 1, 'TaskRenamed', '{"title": "no create"}', now())""",
                (user, task_id),
            )
        for run in (
            lambda: projection.rebuild_user(url, user),
            lambda: projection.rebuild_all(url),
            lambda: projection.check(url),
        ):
            error = _error_within(60, run)
            assert isinstance(error, BrokenStream), repr(error)
            assert str(error) == f"TaskRenamed before TaskCreated in task {task_id}"
        # The command line says it in one line, with its own exit status, not a traceback.
        reason = f"cannot fold the stored events: TaskRenamed before TaskCreated in task {task_id}"
        env = service_env(DATABASE_URL=url)
        for args, said in (
            (("--user", user), f"rebuild: {reason}; the projection is as it was"),
            ((), f"rebuild: {reason}; the projection is as it was"),
            (("--check",), f"check: {reason}; nothing was written"),
        ):
            done = run_cli("rebuild", *args, "--quiet", env=env)
            assert (done.returncode, done.stdout) == (4, ""), done.stderr
            assert done.stderr == f"todo-cqrs {said}\n"

        # Data that does not decode as its type, and a type that no version of the service
        # wrote: each named by its task too.
        for other, kind, data, schema_version, what in (
            ("bench-user-7-undecodable", "TaskCreated", '{"title": 5}', 2,
             "Expected `str`, got `int` - at `$[0][3].title`"),
            ("bench-user-8-unknown-type", "TaskExploded", "{}", 1, "unknown type 'TaskExploded'"),
        ):  # fmt: skip
            other_task = uuid.uuid4()
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO events (user_id, task_id, version, type, data, occurred_at,"
                    " schema_version) VALUES (%s, %s, 1, %s, %s, now(), %s)",
                    (other, other_task, kind, data, schema_version),
                )
            done = run_cli("rebuild", "--user", other, "--quiet", env=env)
            assert (done.returncode, done.stdout) == (4, ""), done.stderr
            assert done.stderr == (
                f"todo-cqrs rebuild: cannot fold the stored events: an event of task"
                f" {other_task} does not decode: {what}; the projection is as it was\n"
            )
        with psycopg.connect(url) as conn:
            assert projection_rows(conn) == before
    finally:
        db.drop_database(server_url, url)
