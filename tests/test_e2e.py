"""End to end through real `todo-cqrs` processes: `serve` (on the test database, and on the
embedded PostgreSQL it starts by itself), `token` and `migrate` (API.md, "Command line" and
"Operations")."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
import psutil
import psycopg
import pytest
from helpers import (
    CLI,
    ServeProcess,
    differences,
    event_streams,
    fold_streams,
    http_client,
    postgres_alive,
    postmaster_pid,
    projection_rows,
    run_cli,
    service_env,
    stop_postgres,
    wait_postgres_stopped,
)
from prometheus_client.parser import text_string_to_metric_families

from todo_cqrs import db

SECRET = "e2e-secret-" + "y" * 40


def mint(user: str, env: dict[str, str], cwd: Path | None = None, *args: str) -> str:
    """A token from `todo-cqrs token USER`: one line, nothing else."""
    result = run_cli("token", user, *args, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", token), token
    return token


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition, None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


# --- a. a walk through, as the README does it with curl, on the test database ---------------


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    """`serve --workers 2` on the test database. TMPDIR is the test's folder, so the metrics
    folder that `serve` makes for its workers lands there and is looked at (and removed)."""
    env = service_env(
        DATABASE_URL=database_url,
        TODO_JWT_SECRET=SECRET,
        TODO_DATA_DIR=str(tmp_path / "data"),
        TMPDIR=str(tmp_path),
    )
    with ServeProcess(env, tmp_path, tmp_path / "serve.log", workers=2) as server:
        yield server


def test_walk_through_with_two_workers(
    served: ServeProcess, database_url: str, tmp_path: Path
) -> None:
    user = f"alice-{uuid.uuid4()}"
    token = mint(user, served.env)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert set(claims) == {"sub", "iat", "exp"}
    assert claims["sub"] == user
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60
    short = jwt.decode(mint(user, served.env, None, "--ttl", "60"), SECRET, algorithms=["HS256"])
    assert short["exp"] - short["iat"] == 60
    for ttl in ("0", "-5"):  # a token born expired is refused, not printed
        refused = run_cli("token", user, "--ttl", ttl, env=served.env)
        assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
        assert "--ttl must be 1 second or more" in refused.stderr
    # A USER the service would refuse as the token's sub: none printed. (A byte that is not
    # UTF-8 reaches `token` as a lone surrogate.)
    for bad, why in (("", "1 to 255"), ("x" * 256, "1 to 255"), ("\udcff", "valid Unicode")):
        refused = run_cli("token", bad, env=served.env)
        assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
        assert why in refused.stderr
    # A token signed with another secret does not pass: `token` signs with TODO_JWT_SECRET.
    stranger = mint(user, {**served.env, "TODO_JWT_SECRET": "another-" + "z" * 40})

    with http_client(served.url, token) as http:
        assert (
            http.get("/tasks", headers={"Authorization": f"Bearer {stranger}"}).status_code == 401
        )

        # create: 201, Location, ETag "1"
        created = http.post(
            "/tasks",
            json={"title": "  Buy milk ", "tags": ["home"], "due_date": "2026-12-01"},
            headers={"X-Request-ID": "e2e-create"},
        )
        assert created.status_code == 201, created.text
        task = created.json()
        task_id = task["id"]
        assert created.headers["location"] == f"/tasks/{task_id}"
        assert created.headers["etag"] == '"1"'
        assert created.headers["x-request-id"] == "e2e-create"
        assert created.headers["content-type"].startswith("application/json")
        assert task == {
            "id": task_id,
            "title": "Buy milk",
            "description": "",
            "completed": False,
            "priority": "medium",
            "due_date": "2026-12-01",
            "tags": ["home"],
            "version": 1,
            "created_at": task["created_at"],
            "updated_at": task["created_at"],
            "completed_at": None,
        }

        # edit with If-Match: one event per changed field
        edited = http.patch(
            f"/tasks/{task_id}",
            json={"title": "Buy oat milk", "priority": "high"},
            headers={"If-Match": '"1"', "X-Request-ID": "e2e-edit"},
        )
        assert edited.status_code == 200, edited.text
        assert edited.headers["etag"] == '"3"'
        assert edited.json() == {
            **task,
            "title": "Buy oat milk",
            "priority": "high",
            "version": 3,
            "updated_at": edited.json()["updated_at"],
        }
        stale = http.patch(f"/tasks/{task_id}", json={"title": "x"}, headers={"If-Match": '"1"'})
        assert stale.status_code == 412
        assert stale.headers["etag"] == '"3"'
        assert stale.headers["content-type"].startswith("application/problem+json")

        completed = http.post(f"/tasks/{task_id}/complete", headers={"X-Request-ID": "e2e-done"})
        assert completed.status_code == 200, completed.text
        done = completed.json()
        assert (done["completed"], done["version"]) == (True, 4)
        assert done["completed_at"] == done["updated_at"]

        # list: the one task, through the filters of the README
        listed = http.get("/tasks", params={"completed": "true", "tag": "home"})
        assert listed.status_code == 200
        assert listed.json() == {"items": [done], "next_cursor": None}
        assert http.get("/tasks", params={"completed": "false"}).json()["items"] == []

        # delete, then it is gone; restore brings it back as it was
        deleted = http.delete(f"/tasks/{task_id}", headers={"X-Request-ID": "e2e-delete"})
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert http.get(f"/tasks/{task_id}").status_code == 404
        assert http.get("/tasks").json() == {"items": [], "next_cursor": None}
        restored = http.post(f"/tasks/{task_id}/restore", headers={"X-Request-ID": "e2e-restore"})
        assert restored.status_code == 200, restored.text
        assert restored.headers["etag"] == '"6"'
        back = restored.json()
        assert back == {**done, "version": 6, "updated_at": back["updated_at"]}
        fetched = http.get(f"/tasks/{task_id}")
        assert (fetched.status_code, fetched.json(), fetched.headers["etag"]) == (200, back, '"6"')

        # the history: every event, with the request that caused it
        history = http.get(f"/tasks/{task_id}/history")
        assert history.status_code == 200
        assert history.json()["next_cursor"] is None
        events = history.json()["items"]
        assert [(e["version"], e["type"], e["data"], e["meta"]) for e in events] == [
            (
                1,
                "TaskCreated",
                {
                    "title": "Buy milk",
                    "description": "",
                    "priority": "medium",
                    "due_date": "2026-12-01",
                    "tags": ["home"],
                },
                {"request_id": "e2e-create", "idempotency_key": None},
            ),
            (
                2,
                "TaskRenamed",
                {"title": "Buy oat milk"},
                {"request_id": "e2e-edit", "idempotency_key": None},
            ),
            (
                3,
                "TaskPriorityChanged",
                {"priority": "high"},
                {"request_id": "e2e-edit", "idempotency_key": None},
            ),
            (4, "TaskCompleted", {}, {"request_id": "e2e-done", "idempotency_key": None}),
            (5, "TaskDeleted", {}, {"request_id": "e2e-delete", "idempotency_key": None}),
            (6, "TaskRestored", {}, {"request_id": "e2e-restore", "idempotency_key": None}),
        ]
        assert all(e["task_id"] == task_id for e in events)
        positions = [e["position"] for e in events]
        assert positions == sorted(positions)
        assert len(set(positions)) == 6

        # X-Request-ID: the caller's when well formed, else a new one, on every answer
        for given in ("bad id!", "x" * 129):
            answer = http.get("/tasks", headers={"X-Request-ID": given})
            assert answer.status_code == 200
            assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", answer.headers["x-request-id"])
            assert answer.headers["x-request-id"] != given
        assert (
            http.get("/no-such-route", headers={"X-Request-ID": "e2e-404"}).headers["x-request-id"]
            == "e2e-404"
        )
        unauthorised = httpx.get(f"{served.url}/tasks", trust_env=False, timeout=15)
        assert unauthorised.status_code == 401
        assert len(unauthorised.headers["x-request-id"]) >= 1

        ready = http.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        health = http.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})

    # The projection row equals the fold of the task's events.
    with psycopg.connect(database_url) as conn:
        streams = event_streams(conn, user)
        assert [len(s) for s in streams.values()] == [6]
        assert differences(projection_rows(conn, user), fold_streams(streams)) == {}

    # Each request is logged once, as one JSON object carrying its request id.
    logged = [
        json.loads(line)
        for line in (tmp_path / "serve.log").read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [e for e in logged if e.get("request_id") == "e2e-create"]
    assert [(e["message"], e["method"], e["path"], e["status"]) for e in mine] == [
        ("request", "POST", "/tasks", 201)
    ]


def test_metrics_sum_the_workers(served: ServeProcess, tmp_path: Path) -> None:
    """`/metrics` of a two-worker serve counts the requests of both workers: /ready is asked
    (on new connections, many at once) until both workers have answered some, and the
    counter then holds every one of them."""
    [folder] = tmp_path.glob("todo-cqrs-metrics-*")

    def ask_ready(_: int) -> int:
        return httpx.get(f"{served.url}/ready", timeout=15, trust_env=False).status_code

    def counting_workers() -> set[str]:
        return {p.stem.rsplit("_", 1)[1] for p in folder.glob("counter_*.db")}

    asked = 0
    with ThreadPoolExecutor(max_workers=12) as pool:
        for _ in range(20):  # at most 240 requests
            statuses = list(pool.map(ask_ready, range(12), timeout=60))
            assert statuses == [200] * 12
            asked += 12
            if len(counting_workers()) == 2:
                break
    assert len(counting_workers()) == 2, "only one worker answered 240 requests"

    with http_client(served.url) as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    labels = {"method": "GET", "route": "/ready", "status": "200"}
    assert metric(answer.text, "todo_http_requests_total", **labels) == asked
    assert metric(answer.text, "todo_http_request_duration_seconds_count", **labels) == asked
    assert (
        metric(answer.text, "todo_http_request_duration_seconds_bucket", le="+Inf", **labels)
        == asked
    )
    names = {family.name for family in text_string_to_metric_families(answer.text)}
    assert {
        "todo_http_requests",
        "todo_http_request_duration_seconds",
        "todo_db_pool_connections",
        "todo_db_pool_connections_in_use",
        "todo_db_pool_requests_waiting",
    } <= names


def test_repeated_header_lines_form_one_list(served: ServeProcess) -> None:
    """RFC 9110 5.3: a list header sent on two lines is one list. Litestar's test client
    joins such lines itself, so only a real server shows that the service does."""
    user = f"lines-{uuid.uuid4()}"
    with http_client(served.url, mint(user, served.env)) as http:
        task = http.post("/tasks", json={"title": "a"}).json()
        url = f"/tasks/{task['id']}"

        completed = http.post(f"{url}/complete", headers=[("If-Match", '"9"'), ("If-Match", '"1"')])
        assert completed.status_code == 200, completed.text
        assert completed.json()["version"] == 2
        malformed = http.post(f"{url}/reopen", headers=[("If-Match", '"2"'), ("If-Match", "bad")])
        assert malformed.status_code == 400, malformed.text
        not_modified = http.get(url, headers=[("If-None-Match", '"1"'), ("If-None-Match", '"2"')])
        assert not_modified.status_code == 304

        two_keys = [("Idempotency-Key", "k-a"), ("Idempotency-Key", "k-b")]
        refused = http.post("/tasks", json={"title": "b"}, headers=two_keys)
        assert refused.status_code == 400, refused.text
        assert refused.json()["detail"] == "Send one Idempotency-Key, not several."
        assert [t["id"] for t in http.get("/tasks").json()["items"]] == [task["id"]]
        for key in ("k-a", "k-b"):  # neither key was used up
            created = http.post("/tasks", json={"title": "b"}, headers={"Idempotency-Key": key})
            assert created.status_code == 201
            assert "idempotent-replayed" not in created.headers


def test_metrics_forget_a_worker_killed_with_sigkill(served: ServeProcess, tmp_path: Path) -> None:
    """A worker killed without a goodbye leaves its live gauges behind; the worker that
    uvicorn starts in its place drops them, so the pool gauge counts live workers only."""
    [folder] = tmp_path.glob("todo-cqrs-metrics-*")
    main = psutil.Process(served.process.pid)

    def workers() -> set[int]:
        found = set()
        for child in main.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a killed one is a zombie until reaped
                if any("spawn_main" in part for part in child.cmdline()):
                    found.add(child.pid)
        return found

    deadline = time.monotonic() + 30
    while len(live := {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("gauge_live*")}) < 2:
        assert time.monotonic() < deadline, "the workers wrote no gauges"
        time.sleep(0.2)
    [first, second] = sorted(workers())
    assert live == {first, second}
    os.kill(first, signal.SIGKILL)
    while len(now := workers()) < 2 or first in now:  # uvicorn starts another
        assert time.monotonic() < deadline + 30, "no worker replaced the killed one"
        time.sleep(0.2)
    [replacement] = now - {second}
    while first in (live := {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("gauge_live*")}):
        assert time.monotonic() < deadline + 60, "the killed worker's gauges stayed"
        time.sleep(0.2)  # until the replacement has started
    assert live <= {second, replacement}


def test_sigterm_closes_open_event_streams(database_url: str, tmp_path: Path) -> None:
    """An open /events/stream never ends by itself: a graceful stop would wait for it
    forever. After TODO_SHUTDOWN_TIMEOUT the stream is cut, and serve exits 0, having
    forgotten its stream's registration (commands of that user stop notifying)."""
    user = f"sse-{uuid.uuid4()}"

    def registrations() -> list[tuple[str]]:
        with psycopg.connect(database_url) as conn:
            query = "SELECT user_id FROM event_listeners WHERE user_id = %s"
            return conn.execute(query, (user,)).fetchall()

    env = service_env(
        DATABASE_URL=database_url,
        TODO_JWT_SECRET=SECRET,
        TODO_DATA_DIR=str(tmp_path / "data"),
        TODO_SSE_HEARTBEAT="0.5",
        TODO_SHUTDOWN_TIMEOUT="2",
    )
    with (
        ServeProcess(env, tmp_path, tmp_path / "serve.log", workers=2) as server,
        http_client(server.url, mint(user, env)) as http,
        http.stream("GET", "/events/stream") as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith("id: ")  # where the stream starts, then a blank line
        assert [next(lines), next(lines)] == ["", ": heartbeat"]
        assert registrations() == [(user,)]
        started = time.monotonic()
        assert server.terminate(timeout=15) == 0
        stopped = time.monotonic() - started
        assert 1.5 < stopped < 8, stopped  # the timeout, not forever, and not at once
        with contextlib.suppress(httpx.HTTPError):  # cut off mid-stream, or ended cleanly
            for _ in lines:
                pass
    log = (tmp_path / "serve.log").read_text()
    assert '"message":"request cut at shutdown"' in log  # the documented cut, said once
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert "ASGI callable returned without" not in log  # the stream's answer was ended
    assert registrations() == []


# --- b. the embedded default: nothing configured ---------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A folder to run `todo-cqrs` in with nothing configured; whatever PostgreSQL it leaves
    running in ./.todo-cqrs/pgdata is stopped afterwards."""
    folder = tmp_path / "home"
    folder.mkdir()
    yield folder
    stop_postgres((folder / ".todo-cqrs" / "pgdata").resolve())


def dead_pid() -> int:
    """The pid of a process that has just exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    return child.pid


@pytest.mark.embedded_postgres
def test_embedded_default_keeps_tasks_across_restarts_and_crashes(home: Path) -> None:
    """With no DATABASE_URL and no TODO_JWT_SECRET, `serve` runs on an embedded PostgreSQL in
    ./.todo-cqrs and `token` signs with the secret kept there. The data survives a graceful
    stop, a crash that leaves the PostgreSQL behind, and a stale postmaster.pid."""
    env = service_env()
    pgdata = (home / ".todo-cqrs" / "pgdata").resolve()
    log = home / "serve.log"

    def list_titles(server: ServeProcess, token: str) -> list[str]:
        with http_client(server.url, token) as http:
            answer = http.get("/tasks")
            assert answer.status_code == 200, answer.text
            return [task["title"] for task in answer.json()["items"]]

    # 1. A first start makes everything: the database, the schema, the kept secret.
    with ServeProcess(env, home, log, start_timeout=90) as server:
        secret_file = home / ".todo-cqrs" / "jwt-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        token = mint("alice", env, home)
        claims = jwt.decode(token, secret_file.read_text().strip(), algorithms=["HS256"])
        assert claims["sub"] == "alice"
        with http_client(server.url, token) as http:
            created = http.post("/tasks", json={"title": "Survive restarts"})
            assert created.status_code == 201, created.text
            assert http.get("/ready").status_code == 200
        assert server.terminate() in (0, -signal.SIGTERM)

    # 2. After a graceful stop: the task and the token are still good.
    with ServeProcess(env, home, log, start_timeout=60) as server:
        assert list_titles(server, token) == ["Survive restarts"]
        server.kill()  # SIGKILL to serve and its workers: a crash
    left_behind = postmaster_pid(pgdata)
    assert left_behind is not None and postgres_alive(pgdata)

    # 3. After a crash that left the PostgreSQL running: reused as it is.
    with ServeProcess(env, home, log, start_timeout=60) as server:
        assert postmaster_pid(pgdata) == left_behind
        token = mint("alice", env, home)
        assert list_titles(server, token) == ["Survive restarts"]
        with http_client(server.url, token) as http:
            assert http.post("/tasks", json={"title": "Second"}).status_code == 201
        server.kill()
    # Then the PostgreSQL goes too, leaving its postmaster.pid behind, naming a dead process.
    lock_file = (pgdata / "postmaster.pid").read_text().splitlines(keepends=True)
    stop_postgres(pgdata)
    assert not (pgdata / "postmaster.pid").exists()
    (pgdata / "postmaster.pid").write_text("".join([f"{dead_pid()}\n", *lock_file[1:]]))

    # 4. Over a stale pid file: a fresh PostgreSQL on the same data.
    with ServeProcess(env, home, log, start_timeout=60) as server:
        assert postgres_alive(pgdata)
        assert postmaster_pid(pgdata) != left_behind
        assert list_titles(server, token) == ["Second", "Survive restarts"]


@pytest.mark.embedded_postgres
def test_embedded_postgres_stops_with_a_graceful_stop(home: Path) -> None:
    """`serve` started the embedded PostgreSQL, so a graceful stop (SIGTERM, as systemd,
    docker or a process manager send it) stops it again: none is left running in the
    background. Also once a crashed run has been recovered from."""
    env = service_env()
    pgdata = (home / ".todo-cqrs" / "pgdata").resolve()
    log = home / "serve.log"
    stopped: dict[str, bool] = {}

    with ServeProcess(env, home, log, start_timeout=90) as server:
        assert postgres_alive(pgdata)
        server.terminate()
    stopped["after SIGTERM"] = wait_postgres_stopped(pgdata, 6)

    with ServeProcess(env, home, log, start_timeout=60) as server:
        server.kill()
    assert postgres_alive(pgdata)  # a crash leaves it behind; the next start reuses it
    with ServeProcess(env, home, log, start_timeout=60) as server:
        server.terminate()
    stopped["after SIGTERM, once a crash was recovered from"] = wait_postgres_stopped(pgdata, 6)

    assert stopped == {
        "after SIGTERM": True,
        "after SIGTERM, once a crash was recovered from": True,
    }


# --- c. migrate ------------------------------------------------------------------------------


@pytest.fixture
def new_database(server_url: str) -> Iterator[Callable[[], str]]:
    """Makes empty databases on the test server; drops them afterwards."""
    urls: list[str] = []

    def make() -> str:
        urls.append(db.create_database(server_url, "todo_cqrs_migrate"))
        return urls[-1]

    yield make
    for url in urls:
        db.drop_database(server_url, url)


def schema_of(url: str) -> tuple[list[str], list[str]]:
    """The applied migrations (one row each) and the service's tables."""
    with psycopg.connect(url) as conn:
        applied = [
            r[0] for r in conn.execute("SELECT migration_id FROM _yoyo_migration ORDER BY 1")
        ]
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                " AND table_name IN ('events', 'tasks', 'idempotency_keys', 'event_listeners')"
                " ORDER BY 1"
            )
        ]
    return applied, tables


ALL_APPLIED = f"applied {len(db.migration_ids())} migration(s): {', '.join(db.migration_ids())}\n"
NONE_PENDING = "applied 0 migration(s): none pending\n"


def test_migrate_twice(new_database: Callable[[], str]) -> None:
    url = new_database()
    env = service_env(DATABASE_URL=url)
    first = run_cli("migrate", env=env)
    assert (first.returncode, first.stdout) == (0, ALL_APPLIED), first.stderr
    second = run_cli("migrate", env=env)
    assert (second.returncode, second.stdout) == (0, NONE_PENDING), second.stderr
    assert schema_of(url) == (
        db.migration_ids(),
        ["event_listeners", "events", "idempotency_keys", "tasks"],
    )


def test_migrations_roll_back_and_apply_again(new_database: Callable[[], str]) -> None:
    """yoyo rollback takes back every migration after 0001 (0002's index included, or
    applying it again would fail on the index left behind); `migrate` then applies them
    again."""
    from yoyo import get_backend, read_migrations

    url = new_database()
    assert db.migrate(url) == db.migration_ids()
    assert db.migration_ids() == [
        "0001.initial",
        "0002.events-position-index",
        "0003.task-body",
        "0004.task-title-casefolded",
        "0005.events-data-bytes",
        "0006.event-listeners",
    ]
    backend = get_backend(db.yoyo_url(url))
    migrations = read_migrations(str(db.migrations_dir()))
    with backend.lock():
        backend.rollback_migrations(
            backend.to_rollback(migrations.filter(lambda m: m.id != "0001.initial"))
        )
    backend.connection.close()
    with psycopg.connect(url) as conn:
        index = conn.execute("SELECT to_regclass('events_position_brin')").fetchone()
    assert index == (None,)
    assert db.migrate(url) == db.migration_ids()[1:]
    assert schema_of(url) == (
        db.migration_ids(),
        ["event_listeners", "events", "idempotency_keys", "tasks"],
    )


def test_rebuild_and_generate_refuse_an_unmigrated_database_and_check_with_user(
    new_database: Callable[[], str],
) -> None:
    env = service_env(DATABASE_URL=new_database())
    for args in (
        ["rebuild"],
        ["rebuild", "--check"],
        ["rebuild", "--user", "alice"],
        ["generate", "--users", "1", "--tasks", "1", "--events", "1"],
    ):
        result = run_cli(*args, "--quiet", env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith(
            ": the database lacks migrations 0001.initial, 0002.events-position-index,"
            " 0003.task-body, 0004.task-title-casefolded, 0005.events-data-bytes,"
            " 0006.event-listeners; run `todo-cqrs migrate`\n"
        ), result.stderr
        assert "Traceback" not in result.stderr
    result = run_cli("rebuild", "--check", "--user", "alice", env=env)
    assert result.returncode == 2
    assert result.stderr == "todo-cqrs check: --check compares every user; drop --user\n"


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("TODO_SHUTDOWN_TIMEOUT", "2.5", "TODO_SHUTDOWN_TIMEOUT: expected whole seconds, 1 or more;"
         " got '2.5'"),
        # -1 used to send heartbeats in a tight loop, each one a query
        ("TODO_SSE_HEARTBEAT", "-1", "TODO_SSE_HEARTBEAT: expected seconds, from 0.5 to 15;"
         " got '-1'"),
        ("TODO_SSE_HEARTBEAT", "0.001", "TODO_SSE_HEARTBEAT: expected seconds, from 0.5 to 15;"
         " got '0.001'"),  # one query per stream per heartbeat
        ("TODO_SSE_HEARTBEAT", "60", "TODO_SSE_HEARTBEAT: expected seconds, from 0.5 to 15;"
         " got '60'"),  # the contract's heartbeat comes at least every 15 s
        ("TODO_REQUEST_TIMEOUT", "0", "TODO_REQUEST_TIMEOUT: expected seconds, from 1 to 600;"
         " got '0'"),  # every request would answer 503
        ("TODO_REQUEST_TIMEOUT", "inf", "TODO_REQUEST_TIMEOUT: expected seconds, from 1 to 600;"
         " got 'inf'"),
        ("TODO_LOG_LEVEL", "LOUD", "TODO_LOG_LEVEL: expected one of DEBUG, INFO, WARNING, ERROR,"
         " CRITICAL; got 'LOUD'"),
        ("TODO_POOL_MIN", "20", "TODO_POOL_MIN (20) is above TODO_POOL_MAX (10)"),
        ("TODO_POOL_MAX", "abc", "TODO_POOL_MAX: expected a whole number, 1 or more; got 'abc'"),
        ("TODO_POOL_TIMEOUT", "nan", "TODO_POOL_TIMEOUT: expected seconds, more than 0;"
         " got 'nan'"),
        ("TODO_PREPARED_STATEMENTS", "maybe", "TODO_PREPARED_STATEMENTS: expected on or off;"
         " got 'maybe'"),
        # libpq's own reason; the commands used to end in a traceback
        ("DATABASE_URL", "notaurl", "DATABASE_URL: expected a PostgreSQL URL or key=value"
         ' string; missing "=" after "notaurl" in connection info string'),
        ("QUERY_DATABASE_URL", "postgresql://h/db?foo=bar", "QUERY_DATABASE_URL: expected a"
         ' PostgreSQL URL or key=value string; invalid URI query parameter: "foo"'),
        ("LISTEN_DATABASE_URL", "host=h port", "LISTEN_DATABASE_URL: expected a PostgreSQL URL"
         ' or key=value string; missing "=" after "port" in connection info string'),
        # RFC 7518 3.2; the message never repeats the secret
        ("TODO_JWT_SECRET", "too-short", "TODO_JWT_SECRET: expected at least 32 bytes; got 9"),
    ],
    ids=lambda value: value if value.startswith("TODO_") else None,
)  # fmt: skip
def test_a_bad_setting_is_named_without_a_traceback(
    tmp_path: Path, setting: str, value: str, message: str
) -> None:
    env = service_env(**{setting: value}, TODO_DATA_DIR=str(tmp_path / "data"))
    for command in (["token", "alice"], ["serve"]):
        result = run_cli(*command, env=env)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == f"todo-cqrs: bad configuration: {message}\n"


def test_bad_arguments_and_folders_are_refused_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    """Each used to end in a traceback: a user id that no user can have (bytes that are not
    UTF-8 reach the command as lone surrogates), a metrics folder that does not exist, and a
    data folder that cannot hold the development secret."""
    env = service_env(DATABASE_URL=database_url, TODO_DATA_DIR=str(tmp_path / "data"))
    result = run_cli("rebuild", "--user", "\udcff", "--quiet", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "todo-cqrs rebuild: --user must be valid Unicode (no lone surrogates)\n"
    missing = str(tmp_path / "missing")
    result = run_cli("serve", env={**env, "PROMETHEUS_MULTIPROC_DIR": missing})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "todo-cqrs: bad configuration: PROMETHEUS_MULTIPROC_DIR: expected an existing folder;"
        f" got {missing!r}\n"
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for command in (["token", "alice"], ["serve"]):
        result = run_cli(*command, env={**env, "TODO_DATA_DIR": str(a_file)})
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            "todo-cqrs: bad configuration: TODO_DATA_DIR: cannot keep the development JWT"
            f" secret in {a_file / 'jwt-secret'}: File exists\n"  # mkdir's reason
        )


def test_commands_say_in_one_line_that_the_database_is_not_reachable(tmp_path: Path) -> None:
    env = service_env(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{db.free_port()}/nothing",
        TODO_DATA_DIR=str(tmp_path / "data"),
    )
    for command in ("serve", "migrate", "rebuild"):
        result = run_cli(command, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(f"todo-cqrs {command}: the database is not reachable: "), (
            result.stderr
        )
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_log_level_takes_pythons_other_names_for_two_levels(tmp_path: Path) -> None:
    env = service_env(TODO_LOG_LEVEL="warn", TODO_DATA_DIR=str(tmp_path / "data"))
    assert run_cli("token", "alice", env=env).returncode == 0  # WARN and FATAL worked before


def test_serve_refuses_an_unreadable_public_key_and_bad_arguments(tmp_path: Path) -> None:
    env = service_env(
        TODO_JWT_PUBLIC_KEY=str(tmp_path / "missing.pem"), TODO_DATA_DIR=str(tmp_path / "data")
    )
    result = run_cli("serve", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("todo-cqrs: bad configuration: TODO_JWT_PUBLIC_KEY: cannot")
    assert "missing.pem" in result.stderr and result.stderr.count("\n") == 1
    result = run_cli(
        "serve", env={**env, "TODO_JWT_PUBLIC_KEY": "", "TODO_JWT_JWKS_URL": "ftp://x"}
    )
    assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr
    assert result.stderr.startswith("todo-cqrs: bad configuration: TODO_JWT_JWKS_URL"), (
        result.stderr
    )
    env = service_env(TODO_DATA_DIR=str(tmp_path / "data"))
    for args, error in [
        (["serve", "--port", "99999"], "expected a TCP port, 1 to 65535; got '99999'"),
        (["serve", "--workers", "0"], "expected a whole number, 1 or more; got '0'"),
        (["generate", "--users", "0"], "expected a whole number, 1 or more; got '0'"),
    ]:
        result = run_cli(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.rstrip().endswith(error), result.stderr
    result = run_cli("generate", "--tasks", "10", "--events", "9", env=env)
    assert (result.returncode, result.stderr) == (
        2,
        "todo-cqrs generate: --events must be at least --tasks (each task starts with"
        " TaskCreated)\n",
    )


def test_migrate_from_several_processes_at_once(new_database: Callable[[], str]) -> None:
    url = new_database()
    env = service_env(DATABASE_URL=url)
    processes = [
        subprocess.Popen(
            [*CLI, "migrate"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outcomes: list[tuple[int, str, str]] = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=90)
            outcomes.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert [code for code, _, _ in outcomes] == [0] * 6, outcomes
    assert sorted(out for _, out, _ in outcomes) == sorted([ALL_APPLIED] + [NONE_PENDING] * 5)
    assert schema_of(url) == (
        db.migration_ids(),
        ["event_listeners", "events", "idempotency_keys", "tasks"],
    )


def test_serve_answers_ready_on_a_database_it_migrated(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    """`serve` applies the migrations itself before it serves (a fresh, empty database)."""
    url = new_database()
    env = service_env(DATABASE_URL=url, TODO_JWT_SECRET=SECRET)
    with ServeProcess(env, tmp_path, tmp_path / "serve.log") as server:
        with http_client(server.url) as http:
            answer = http.get("/ready", headers={"X-Request-ID": "e2e-ready"})
        assert (answer.status_code, answer.json()) == (200, {"status": "ready"})
        assert answer.headers["x-request-id"] == "e2e-ready"
    # One worker logs each request as one JSON object carrying its request id.
    logged = [
        json.loads(line)
        for line in (tmp_path / "serve.log").read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [e for e in logged if e.get("request_id") == "e2e-ready"]
    assert [(e["message"], e["method"], e["path"], e["status"]) for e in mine] == [
        ("request", "GET", "/ready", 200)
    ]
    assert schema_of(url) == (
        db.migration_ids(),
        ["event_listeners", "events", "idempotency_keys", "tasks"],
    )
