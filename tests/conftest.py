"""Fixtures: a real PostgreSQL for the whole run, and HTTP clients through the real app.

TEST_DATABASE_URL names a server to use; without it an embedded PostgreSQL is started in a
temporary folder. Either way the run gets a fresh database of its own, dropped at the end.
Tests are isolated by user: each test's users are new, random ids.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from psycopg.conninfo import make_conninfo

from todo_cqrs import db
from todo_cqrs.auth import mint_token
from todo_cqrs.config import Settings
from todo_cqrs.http import create_app

JWT_SECRET = "test-secret-" + "x" * 40


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="todo-cqrs-test-") as folder:
        try:
            yield db.start_embedded(Path(folder))
        finally:
            db.stop_embedded(Path(folder))


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A new database for this run, migrated."""
    url = db.create_database(server_url, "todo_cqrs_test")
    db.migrate(url)
    yield url
    db.drop_database(server_url, url)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    """The answer is a problem+json body of this status, with its required members."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The in-process app's settings. TEST_VIA_PGBOUNCER=host:port sends its queries and
    commands through a PgBouncer in transaction mode (see test_pgbouncer.py); the tests'
    own checks, migrations and LISTEN go straight to the database."""
    app_url, bouncer = database_url, os.environ.get("TEST_VIA_PGBOUNCER")
    if bouncer:
        host, port = bouncer.rsplit(":", 1)
        app_url = make_conninfo(database_url, host=host, port=port)
    return Settings(
        database_url=app_url,
        listen_database_url=database_url,
        prepared_statements=not bouncer,
        data_dir=tmp_path_factory.mktemp("data"),
        jwt_secret=JWT_SECRET,
        jwt_issuer=None,
        jwt_audience=None,
        pool_min=1,
        pool_max=10,
        pool_timeout=5.0,
        log_level="WARNING",
    )


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient[Any]]:
    with TestClient(app=create_app(settings)) as test_client:  # type: ignore[arg-type]
        yield test_client


class Api:
    """The test client, speaking as one user."""

    def __init__(self, client: TestClient[Any], user: str) -> None:
        self.client = client
        self.user = user
        self.auth = {"Authorization": f"Bearer {mint_token(JWT_SECRET, user)}"}

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.request("POST", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> Any:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.request("DELETE", url, **kwargs)

    def create(self, **fields: Any) -> dict[str, Any]:
        response = self.post("/tasks", json={"title": "a task", **fields})
        assert response.status_code == 201, response.text
        task: dict[str, Any] = response.json()
        return task


@pytest.fixture
def api(client: TestClient[Any]) -> Api:
    return Api(client, f"user-{uuid.uuid4()}")


@pytest.fixture
def other_api(client: TestClient[Any]) -> Api:
    return Api(client, f"user-{uuid.uuid4()}")
