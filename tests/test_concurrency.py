"""Concurrent commands through a real two-worker `serve` (API.md, "Concurrency" and
"Idempotency"): none is lost, versions stay contiguous, and the projection equals a fold of
the events, as the database itself shows."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from helpers import (
    ServeProcess,
    differences,
    event_streams,
    fold_streams,
    http_client,
    projection_rows,
    service_env,
    version_gaps,
)

from todo_cqrs import commands, db
from todo_cqrs.auth import mint_token
from todo_cqrs.domain import (
    Command,
    CompleteTask,
    CreateTask,
    EditTask,
    ReopenTask,
    Task,
    decide,
    fold,
    parse_command,
)

SECRET = "concurrency-secret-" + "c" * 40
CLIENTS = 24
ROUNDS = 10
TASKS = 3


def serve_two_workers(database_url: str, folder: Path) -> ServeProcess:
    env = service_env(
        DATABASE_URL=database_url,
        TODO_JWT_SECRET=SECRET,
        TODO_DATA_DIR=str(folder / "data"),
        TODO_LOG_LEVEL="WARNING",
        TMPDIR=str(folder),
    )
    return ServeProcess(env, folder, folder / "serve.log", workers=2)


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serve_two_workers(database_url, tmp_path_factory.mktemp("concurrency")) as process:
        yield process


class Sent(msgspec.Struct):
    """One command sent, and what it answered."""

    request_id: str
    task_id: uuid.UUID
    command: Command
    status: int
    body: bytes


TITLES = ["alpha", "beta", "gamma"]
PRIORITIES = ["low", "medium", "high"]
TAG_SETS = [[], ["a"], ["a", "b"], ["b", "a"], ["c"]]


def pick(rng: random.Random) -> tuple[str, str, dict[str, Any] | None, Command]:
    """A random command: (method, path suffix, JSON body, the domain command it means).
    Few values, so that some commands change nothing."""
    kind = rng.randrange(6)
    if kind < 4:
        body: dict[str, Any] = [
            {"title": rng.choice(TITLES)},
            {"priority": rng.choice(PRIORITIES)},
            {"tags": rng.choice(TAG_SETS)},
            {
                "title": rng.choice(TITLES),
                "priority": rng.choice(PRIORITIES),
                "tags": rng.choice(TAG_SETS),
                "completed": rng.random() < 0.5,
            },
        ][kind]
        return "PATCH", "", body, parse_command(EditTask, body)
    if kind == 4:
        return "POST", "/complete", None, CompleteTask()
    return "POST", "/reopen", None, ReopenTask()


def test_concurrent_commands_lose_nothing(server: ServeProcess, database_url: str) -> None:
    user = f"hammer-{uuid.uuid4()}"
    token = mint_token(SECRET, user)
    with http_client(server.url, token) as http:
        created = [
            http.post(
                "/tasks",
                json={"title": TITLES[i], "tags": ["a"]},
                headers={"X-Request-ID": f"create-{i}"},
            )
            for i in range(TASKS)
        ]
    assert [r.status_code for r in created] == [201] * TASKS
    task_ids = [uuid.UUID(r.json()["id"]) for r in created]

    start = threading.Barrier(CLIENTS, timeout=30)

    def client(number: int) -> list[Sent]:
        rng = random.Random(number)
        sent = []
        with http_client(server.url, token) as http:
            start.wait()
            for round_ in range(ROUNDS):
                task_id = task_ids[(number + round_) % TASKS]
                method, suffix, body, command = pick(rng)
                request_id = f"c{number}-r{round_}"
                answer = http.request(
                    method,
                    f"/tasks/{task_id}{suffix}",
                    json=body,
                    headers={"X-Request-ID": request_id},
                )
                sent.append(Sent(request_id, task_id, command, answer.status_code, answer.content))
        return sent

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = [pool.submit(client, n) for n in range(CLIENTS)]
        results = [s for f in futures for s in f.result(timeout=120)]
    assert len(results) == CLIENTS * ROUNDS
    assert [(s.request_id, s.status) for s in results if s.status != 200] == []

    with psycopg.connect(database_url) as conn:
        streams = event_streams(conn, user)
        rows = projection_rows(conn, user)
        caused_by: dict[str, list[tuple[uuid.UUID, int]]] = {}
        for task_id, version, request_id in conn.execute(
            "SELECT task_id, version, request_id FROM events WHERE user_id = %s"
            " ORDER BY task_id, version",
            (user,),
        ):
            caused_by.setdefault(request_id, []).append((task_id, version))

    # Versions are exactly 1..N, the row is at N and equals the fold of the events.
    assert sorted(streams) == sorted((user, t) for t in task_ids)
    assert version_gaps(streams) == {}
    for key, events in streams.items():
        assert rows[key].version == len(events)
        times = [r.occurred_at for r in events]
        assert times == sorted(times), f"{key}: events go back in time"
    assert differences(rows, fold_streams(streams)) == {}

    # Every event was caused by one request that was sent: a create or a command.
    assert set(caused_by) - {s.request_id for s in results} == {f"create-{i}" for i in range(TASKS)}
    for i, task_id in enumerate(task_ids):
        assert caused_by[f"create-{i}"] == [(task_id, 1)]

    # Each command was decided on the task as it stood right before it: its events are
    # exactly decide(state before, command), and it answered the task right after them.
    for sent in results:
        stream = streams[(user, sent.task_id)]
        answered = msgspec.json.decode(sent.body, type=Task)
        assert answered == fold(stream[: answered.version]), sent.request_id
        mine = caused_by.get(sent.request_id, [])
        if mine:
            versions = [v for t, v in mine]
            assert {t for t, v in mine} == {sent.task_id}
            assert versions == list(range(versions[0], versions[-1] + 1)), sent.request_id
            assert versions[-1] == answered.version, sent.request_id
            before = fold(stream[: versions[0] - 1])
            expected = [r.event for r in stream[versions[0] - 1 : versions[-1]]]
        else:  # a command that changed nothing: nothing to do on the task it answered
            before, expected = answered, []
        assert decide(before, sent.command) == expected, sent.request_id
    changed = sum(1 for s in results if s.request_id in caused_by)
    assert 0 < changed <= len(results)


def test_parallel_retries_with_one_idempotency_key_create_one_task(
    server: ServeProcess, database_url: str
) -> None:
    user = f"retry-{uuid.uuid4()}"
    token = mint_token(SECRET, user)
    parallel = 10
    rounds = 3
    for round_ in range(rounds):
        key = f"create-{uuid.uuid4()}"
        body = {"title": f"Pay rent {round_}", "tags": ["bills"], "priority": "high"}
        start = threading.Barrier(parallel, timeout=30)

        def post(_: int, key: str = key, body: dict[str, Any] = body, start: Any = start) -> Any:
            with http_client(server.url, token) as http:
                start.wait()
                return http.post("/tasks", json=body, headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            answers = list(pool.map(post, range(parallel), timeout=60))

        assert sorted({a.status_code for a in answers}) in ([201], [201, 409])
        created = [a for a in answers if a.status_code == 201]
        originals = [a for a in created if "idempotent-replayed" not in a.headers]
        assert len(originals) == 1
        assert all(
            a.headers["idempotent-replayed"] == "true" for a in created if a not in originals
        )
        assert {(a.content, a.headers["location"], a.headers["etag"]) for a in created} == {
            (originals[0].content, originals[0].headers["location"], '"1"')
        }
        for conflict in (a for a in answers if a.status_code == 409):
            assert conflict.headers["content-type"].startswith("application/problem+json")
            assert conflict.json()["status"] == 409
        task = originals[0].json()
        assert (task["title"], task["tags"], task["priority"], task["version"]) == (
            body["title"],
            ["bills"],
            "high",
            1,
        )

        # A later retry replays the same answer, and still nothing new is appended.
        with http_client(server.url, token) as http:
            again = http.post("/tasks", json=body, headers={"Idempotency-Key": key})
        assert (again.status_code, again.content, again.headers["idempotent-replayed"]) == (
            201,
            originals[0].content,
            "true",
        )

        with psycopg.connect(database_url) as conn:
            appended = conn.execute(
                "SELECT task_id, version, type FROM events WHERE user_id = %s"
                " AND idempotency_key = %s",
                (user, key),
            ).fetchall()
        assert appended == [(uuid.UUID(task["id"]), 1, "TaskCreated")]

    with psycopg.connect(database_url) as conn:
        streams = event_streams(conn, user)
        rows = projection_rows(conn, user)
    assert len(streams) == rounds
    assert [len(s) for s in streams.values()] == [1] * rounds
    assert differences(rows, fold_streams(streams)) == {}


def test_a_command_that_loses_the_race_starts_over_from_the_new_version(
    database_url: str,
) -> None:
    """Two edits read version 1 and then wait for the user's lock (held here): the first to
    write makes version 2, the other finds the row moved on, writes nothing, reads again and
    makes version 3. Both are answered 200 and no event is lost or doubled."""
    user, task_id = f"loser-{uuid.uuid4()}", uuid.uuid4()

    def waiting_for_the_lock(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
        return int(row[0]) if row else 0

    async def scenario() -> tuple[commands.Answer, commands.Answer]:
        pool = db.create_pool(database_url, min_size=2, max_size=4, timeout=10)
        await pool.open()
        try:
            created = await commands.execute(
                pool, user, task_id, parse_command(CreateTask, {"title": "one"})
            )
            assert created.status == 201
            with (
                psycopg.connect(database_url) as holder,
                psycopg.connect(database_url, autocommit=True) as watcher,
            ):
                holder.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (user,))
                edits = [
                    asyncio.create_task(
                        commands.execute(
                            pool, user, task_id, parse_command(EditTask, {"title": title})
                        )
                    )
                    for title in ("two", "three")
                ]
                for _ in range(500):
                    if waiting_for_the_lock(watcher) == 2:
                        break
                    await asyncio.sleep(0.01)
                assert waiting_for_the_lock(watcher) == 2, "both edits should wait for the lock"
                holder.rollback()
            first, second = await asyncio.gather(*edits)
            return first, second
        finally:
            await pool.close()

    first, second = asyncio.run(scenario())
    assert (first.status, second.status) == (200, 200)
    bodies = [msgspec.json.decode(a.body, type=Task) for a in (first, second)]
    assert sorted(b.version for b in bodies) == [2, 3]
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "SELECT version, type, data->>'title' FROM events"
            " WHERE user_id = %s AND task_id = %s ORDER BY position",
            (user, task_id),
        ).fetchall()
        row = conn.execute(
            "SELECT version, title FROM tasks WHERE user_id = %s AND task_id = %s",
            (user, task_id),
        ).fetchone()
    last = max(bodies, key=lambda b: b.version)
    assert [(v, t) for v, t, _ in events] == [
        (1, "TaskCreated"),
        (2, "TaskRenamed"),
        (3, "TaskRenamed"),
    ]
    assert [title for _, _, title in events] == [
        "one",
        *[b.title for b in sorted(bodies, key=lambda b: b.version)],
    ]
    assert row == (3, last.title)


def test_commands_stay_serialised_when_the_database_defaults_to_repeatable_read(
    server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The expected-version write needs READ COMMITTED; the service asks for it on every
    connection, so a server whose default is REPEATABLE READ changes nothing (it used to
    answer half of these commands 503, "could not serialize access")."""
    url = db.create_database(server_url, "todo_cqrs_repeatable")
    folder = tmp_path_factory.mktemp("repeatable")
    try:
        db.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            name = conn.info.dbname
            conn.execute(
                f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
            )
        user = f"repeatable-{uuid.uuid4()}"
        token = mint_token(SECRET, user)
        with serve_two_workers(url, folder) as serve:
            with http_client(serve.url, token) as http:
                task_id = http.post("/tasks", json={"title": "contended"}).json()["id"]
            start = threading.Barrier(12, timeout=30)

            def client(number: int) -> list[int]:
                with http_client(serve.url, token) as http:
                    start.wait()
                    return [
                        http.patch(f"/tasks/{task_id}", json={"title": f"{number}-{i}"}).status_code
                        for i in range(10)
                    ]

            with ThreadPoolExecutor(max_workers=12) as pool:
                statuses = [
                    s for f in [pool.submit(client, n) for n in range(12)] for s in f.result(120)
                ]
        assert statuses == [200] * 120
        with psycopg.connect(url) as conn:
            streams = event_streams(conn, user)
            rows = projection_rows(conn, user)
        assert [len(events) for events in streams.values()] == [121]
        assert version_gaps(streams) == {}
        assert differences(rows, fold_streams(streams)) == {}
    finally:
        db.drop_database(server_url, url)
