"""Read replicas with read-your-writes: a primary and a hot standby of it on loopback.

Queries go to the standby (QUERY_DATABASE_URL); a query that sends back a command's
X-Consistency-Token is answered there only once the standby has replayed past it, else by
the primary; with the standby stopped, every query is answered by the primary.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Api, assert_problem
from litestar.testing import TestClient

from todo_cqrs import db
from todo_cqrs.config import Settings
from todo_cqrs.http import CONSISTENCY_TOKEN, create_app

WAIT = 0.5  # the replica wait in these tests (default 2 s): a lagging read costs this much


class Replication:
    def __init__(self, primary: db.LocalServer, standby: db.LocalServer) -> None:
        self.primary = primary
        self.standby = standby

    def standby_sql(self, sql: str) -> Any:
        with psycopg.connect(self.standby.url, autocommit=True) as conn:
            row = conn.execute(sql).fetchone()
            return row[0] if row else None

    def pause(self) -> None:
        self.standby_sql("SELECT pg_wal_replay_pause()")

    def resume(self) -> None:
        self.standby_sql("SELECT pg_wal_replay_resume()")

    def caught_up(self, timeout: float = 10.0) -> None:
        with psycopg.connect(self.primary.url, autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert target is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sql = f"SELECT pg_last_wal_replay_lsn() >= '{target[0]}'::pg_lsn"
            if self.standby_sql(sql):
                return
            time.sleep(0.05)
        raise AssertionError(f"the standby did not replay to {target[0]} in {timeout} s")


@pytest.fixture(scope="module")
def replication() -> Iterator[Replication]:
    binaries = db.server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) here")
    folder = Path(tempfile.mkdtemp(prefix="todo-replica-"))
    servers: list[db.LocalServer] = []
    try:
        servers.append(db.LocalServer.primary(binaries, folder, fsync=False))
        db.migrate(servers[0].url)
        servers.append(servers[0].standby(folder))
        replication = Replication(*servers)
        replication.caught_up()
        yield replication
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def replica_client(
    replication: Replication, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient[Any]]:
    primary = replication.primary.url
    replica_settings = dataclasses.replace(
        settings,
        database_url=primary,
        listen_database_url=primary,
        prepared_statements=True,
        query_database_url=replication.standby.url,
        replica_wait=WAIT,
        data_dir=tmp_path_factory.mktemp("replica-data"),
    )
    with TestClient(app=create_app(replica_settings)) as client:  # type: ignore[arg-type]
        yield client


@pytest.fixture
def user(replica_client: TestClient[Any]) -> Api:
    return Api(replica_client, f"user-{uuid.uuid4()}")


def metric(api: Api, name: str, label: str) -> float:
    text = api.client.get("/metrics").text
    found = re.search(rf'^{name}\{{[a-z]+="{label}"\}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def fallbacks(api: Api, reason: str) -> float:
    return metric(api, "todo_replica_fallbacks_total", reason)


def replica_reads(api: Api) -> float:
    return metric(api, "todo_query_reads_total", "replica")


def create(api: Api, title: str) -> tuple[dict[str, Any], str]:
    response = api.post("/tasks", json={"title": title})
    assert response.status_code == 201, response.text
    return response.json(), response.headers[CONSISTENCY_TOKEN]


def test_every_command_answer_carries_a_wal_position(user: Api, replication: Replication) -> None:
    task, token = create(user, "first")
    assert re.fullmatch(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}", token)
    with psycopg.connect(replication.primary.url) as conn:
        now = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert now is not None and db.parse_lsn(token) <= db.parse_lsn(now[0])  # type: ignore[operator]
    for response in (
        user.patch(f"/tasks/{task['id']}", json={"title": "second"}),
        user.post(f"/tasks/{task['id']}/complete"),
        user.delete(f"/tasks/{task['id']}"),
        user.post(f"/tasks/{task['id']}/restore"),
    ):
        assert response.status_code in (200, 204), response.text
        later = response.headers[CONSISTENCY_TOKEN]
        assert db.parse_lsn(later) > db.parse_lsn(token)  # type: ignore[operator]
        token = later


def test_queries_read_the_replica_and_a_token_waits_for_it(
    user: Api, replication: Replication
) -> None:
    replication.pause()
    try:
        task, token = create(user, "written while the standby is paused")
        path = f"/tasks/{task['id']}"
        reads, lagged = replica_reads(user), fallbacks(user, "lag")

        # Without the token the query goes to the standby, which has not seen the task yet.
        assert_problem(user.get(path), 404)
        assert replica_reads(user) == reads + 1

        # With it, the standby cannot answer within the wait: the primary does.
        started = time.monotonic()
        seen = user.get(path, headers={CONSISTENCY_TOKEN: token})
        assert seen.status_code == 200, seen.text
        assert seen.json() == task
        assert time.monotonic() - started >= WAIT
        assert fallbacks(user, "lag") == lagged + 1
    finally:
        replication.resume()

    # Once the standby replays past the token, it answers the same query itself.
    replication.caught_up()
    reads = replica_reads(user)
    seen = user.get(path, headers={CONSISTENCY_TOKEN: token})
    assert seen.status_code == 200 and seen.json() == task
    assert replica_reads(user) == reads + 1
    assert fallbacks(user, "lag") == lagged + 1


def test_every_query_honours_the_token(user: Api, replication: Replication) -> None:
    task, _ = create(user, "v1")
    replication.caught_up()
    replication.pause()
    try:
        edited = user.patch(f"/tasks/{task['id']}", json={"title": "v2"})
        token = {CONSISTENCY_TOKEN: edited.headers[CONSISTENCY_TOKEN]}
        path = f"/tasks/{task['id']}"
        # The paused standby still has v1 everywhere ...
        assert user.get(path).json()["title"] == "v1"
        # ... and with the token every query shows v2.
        assert user.get(path, headers=token).json()["title"] == "v2"
        assert user.get("/tasks", headers=token).json()["items"][0]["title"] == "v2"
        history = user.get(f"{path}/history", headers=token).json()["items"]
        assert [e["type"] for e in history] == ["TaskCreated", "TaskRenamed"]
        assert user.get(f"{path}?version=2", headers=token).json()["title"] == "v2"
        feed = user.get("/events", headers=token).json()["items"]
        assert [e["version"] for e in feed] == [1, 2]
    finally:
        replication.resume()


def test_a_client_never_reads_older_than_its_own_write(user: Api, replication: Replication) -> None:
    """Replay is paused and resumed at random moments while the client writes and reads
    back with its token: every read shows the client's own latest write."""
    task, _ = create(user, "v0")
    stop = threading.Event()

    def flap() -> None:
        paused = False
        while not stop.is_set():
            replication.pause() if not paused else replication.resume()
            paused = not paused
            stop.wait(0.03 if paused else 0.07)
        replication.resume()

    flapper = threading.Thread(target=flap)
    flapper.start()
    try:
        for i in range(1, 41):
            edited = user.patch(f"/tasks/{task['id']}", json={"title": f"v{i}"})
            assert edited.status_code == 200, edited.text
            token = {CONSISTENCY_TOKEN: edited.headers[CONSISTENCY_TOKEN]}
            seen = user.get(f"/tasks/{task['id']}", headers=token)
            assert (seen.json()["title"], seen.json()["version"]) == (f"v{i}", i + 1)
            listed = user.get("/tasks", headers=token).json()["items"]
            assert [t["title"] for t in listed] == [f"v{i}"]
    finally:
        stop.set()
        flapper.join(timeout=10)


def test_with_the_standby_stopped_every_query_is_answered_by_the_primary(
    user: Api, replication: Replication, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db.QueryRouter, "RETRY_AFTER", 0.5)
    task, token = create(user, "before the stop")
    path = f"/tasks/{task['id']}"
    replication.caught_up()
    assert user.get(path).status_code == 200  # a pooled standby connection exists now
    unavailable = fallbacks(user, "unavailable")
    replication.standby.stop()
    try:
        edited = user.patch(path, json={"title": "while the standby is down"})
        assert edited.status_code == 200, edited.text
        for headers in ({}, {CONSISTENCY_TOKEN: edited.headers[CONSISTENCY_TOKEN]}):
            for query in (path, "/tasks", f"{path}/history", f"{path}?version=1", "/events"):
                response = user.get(query, headers=headers)
                assert response.status_code == 200, (query, response.text)
            assert user.get(path, headers=headers).json()["title"] == "while the standby is down"
        assert fallbacks(user, "unavailable") > unavailable
    finally:
        replication.standby.start()
    # Back up: after the retry interval, queries read the standby again.
    replication.caught_up()
    time.sleep(db.QueryRouter.RETRY_AFTER)
    deadline = time.monotonic() + 10
    reads = replica_reads(user)
    while replica_reads(user) == reads and time.monotonic() < deadline:
        assert user.get(path, headers={CONSISTENCY_TOKEN: token}).status_code == 200
    assert replica_reads(user) > reads


def test_a_token_that_is_not_a_wal_position_is_refused(user: Api) -> None:
    for bad in ("yesterday", "0/", "1/2/3", "G/0", "123456789/0"):
        body = assert_problem(user.get("/tasks", headers={CONSISTENCY_TOKEN: bad}), 400)
        assert CONSISTENCY_TOKEN in body["detail"]
