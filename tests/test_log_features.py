"""The event log as a feature: time travel, the feed, the SSE stream, evolving events, meta.

Time travel, the feed's paging, evolving events and meta go through the in-process app
(`api` fixtures). The gap-free feed and the stream run against a real `todo-cqrs serve`
process with two workers, so that commands and reads land on different processes and the
stream is woken through PostgreSQL's LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from conftest import JWT_SECRET, Api, assert_problem
from litestar.testing import TestClient
from psycopg_pool import AsyncConnectionPool

from todo_cqrs import db, eventstore
from todo_cqrs.auth import mint_token

EVENT_KEYS = {"position", "task_id", "version", "type", "data", "occurred_at", "meta"}
TIME_KEYS = ("created_at", "updated_at", "completed_at")
ONE_MICROSECOND = timedelta(microseconds=1)


def _new_user() -> str:
    return f"user-{uuid.uuid4()}"


def _auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(JWT_SECRET, user)}"}


def _at(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return moment


def _with_times(task: dict[str, Any]) -> dict[str, Any]:
    """A task with its times parsed, so that equal moments compare equal however written."""
    return {k: (_at(v) if k in TIME_KEYS and v is not None else v) for k, v in task.items()}


def _history(api: Api, task_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/tasks/{task_id}/history", params={"limit": 200})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["next_cursor"] is None
    items: list[dict[str, Any]] = page["items"]
    return items


def _feed(api: Api, **params: Any) -> dict[str, Any]:
    response = api.get("/events", params=params)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"items", "next_position"}
    page: dict[str, Any] = response.json()
    return page


def _assert_problem(response: Any, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == status


# --- 1. time travel --------------------------------------------------------------------------


def _travel(api: Api, task_id: str, **params: Any) -> Any:
    return api.get(f"/tasks/{task_id}", params=params)


def _assert_state(response: Any, expected: dict[str, Any]) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == expected
    assert response.headers["etag"] == f'"{expected["version"]}"'


def test_version_returns_each_past_state(api: Api) -> None:
    created = api.create(title="first title", tags=["a"])
    task_id = created["id"]
    states: dict[int, dict[str, Any]] = {1: created}

    def command(version: int, method: str, path: str = "", **kwargs: Any) -> dict[str, Any]:
        response = api.request(method, f"/tasks/{task_id}{path}", **kwargs)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["version"] == version
        states[version] = body
        return body

    command(2, "PATCH", json={"title": "second title"})
    command(3, "PATCH", json={"priority": "high"})
    command(4, "POST", "/complete")
    # One PATCH, two events: due_date (version 5), then tags (version 6), at one moment.
    last = command(6, "PATCH", json={"tags": ["a", "b"], "due_date": "2030-01-02"})
    states[5] = {
        **states[4],
        "due_date": "2030-01-02",
        "version": 5,
        "updated_at": last["updated_at"],
    }

    assert states[2]["title"] == "second title" and states[1]["title"] == "first title"
    assert states[4]["completed"] is True and states[4]["completed_at"] is not None
    for version in range(1, 7):
        _assert_state(_travel(api, task_id, version=version), states[version])
    assert _travel(api, task_id, version=7).status_code == 404
    assert _travel(api, task_id, version=1000).status_code == 404
    # The present, from the projection, is the last state too.
    _assert_state(api.get(f"/tasks/{task_id}"), states[6])


def test_version_folds_across_the_chunks_of_a_long_history(api: Api) -> None:
    """Time travel reads a task's events in chunks of eventstore.TASK_EVENTS_CHUNK (20):
    the fold carries on across them, and stops at the version asked for."""
    assert eventstore.TASK_EVENTS_CHUNK == 20
    task_id = api.create(title="title 1")["id"]
    titles = {1: "title 1"}
    for version in range(2, 52):  # 51 events: two whole chunks and part of a third
        titles[version] = f"title {version}"
        response = api.patch(f"/tasks/{task_id}", json={"title": titles[version]})
        assert response.json()["version"] == version
    for version in (19, 20, 21, 40, 41, 50, 51):
        body = _travel(api, task_id, version=version).json()
        assert (body["version"], body["title"]) == (version, titles[version])
    assert _travel(api, task_id, version=51).json() == api.get(f"/tasks/{task_id}").json()
    assert _travel(api, task_id, version=52).status_code == 404


def test_an_event_that_cannot_be_read_fails_time_travel_and_ends_its_query(
    api: Api, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An event that cannot be decoded, in the second chunk of a long history: time travel
    answers 500, and the stream it left is closed before its connection goes back to the
    pool (psycopg would otherwise find the connection still busy with the query)."""
    task_id = api.create(title="title 1")["id"]
    for version in range(2, 46):
        assert api.patch(f"/tasks/{task_id}", json={"title": f"title {version}"}).is_success
    with psycopg.connect(database_url, autocommit=True) as conn:
        saved = conn.execute(
            "UPDATE events SET data = '{\"title\": 5}' WHERE task_id = %s AND version = 30"
            " RETURNING (SELECT data FROM events WHERE task_id = %s AND version = 30)",
            (task_id, task_id),
        ).fetchone()
        assert saved is not None
        try:
            with caplog.at_level(logging.WARNING):
                for _ in range(3):
                    problem = assert_problem(_travel(api, task_id, version=45), 500)
                    assert problem["detail"] == "The service failed; the error is logged."
            assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []
            assert _travel(api, task_id, version=29).json()["title"] == "title 29"
        finally:
            conn.execute(
                "UPDATE events SET data = %s WHERE task_id = %s AND version = 30",
                (psycopg.types.json.Jsonb(saved[0]), task_id),
            )
    assert _travel(api, task_id, version=45).json()["title"] == "title 45"


def test_as_of_returns_the_state_at_a_moment(api: Api) -> None:
    created = api.create(title="at one")
    task_id = created["id"]
    renamed = api.patch(f"/tasks/{task_id}", json={"title": "at two"}).json()
    completed = api.post(f"/tasks/{task_id}/complete").json()
    reopened = api.post(f"/tasks/{task_id}/reopen").json()
    states = [created, renamed, completed, reopened]
    events = _history(api, task_id)
    assert [e["type"] for e in events] == [
        "TaskCreated",
        "TaskRenamed",
        "TaskCompleted",
        "TaskReopened",
    ]
    moments = [_at(e["occurred_at"]) for e in events]
    assert moments == sorted(moments) and len(set(moments)) == 4
    assert completed["completed_at"] is not None
    assert _at(completed["completed_at"]) == moments[2]
    plus_0530 = timezone(timedelta(hours=5, minutes=30))
    minus_07 = timezone(timedelta(hours=-7))

    for index, moment in enumerate(moments):
        # Exactly at the event's moment (inclusive), in UTC and in two other offsets.
        for written in (
            moment.astimezone(UTC).isoformat(),
            moment.astimezone(plus_0530).isoformat(),
            moment.astimezone(minus_07).isoformat(),
            moment.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        ):
            _assert_state(_travel(api, task_id, as_of=written), states[index])
        # Just before it, by a microsecond or by a nanosecond (which a datetime cannot hold:
        # rounding it to the nearest microsecond would land on the event): the state before.
        earlier = (moment - ONE_MICROSECOND).astimezone(UTC).isoformat(timespec="microseconds")
        for just_before in (earlier, earlier.replace("+00:00", "999Z")):
            if index == 0:
                assert _travel(api, task_id, as_of=just_before).status_code == 404
            else:
                _assert_state(_travel(api, task_id, as_of=just_before), states[index - 1])
    # Half-way between two commands.
    between = moments[1] + (moments[2] - moments[1]) / 2
    _assert_state(_travel(api, task_id, as_of=between.isoformat()), renamed)
    # Long after the last event: the present.
    later = (moments[-1] + timedelta(days=365)).isoformat()
    _assert_state(_travel(api, task_id, as_of=later), reopened)
    # Long before creation.
    for long_ago in ("2000-01-01T00:00:00Z", "2000-01-01T00:00:00.1234567Z"):
        assert _travel(api, task_id, as_of=long_ago).status_code == 404


def test_time_travel_over_a_deleted_task(api: Api) -> None:
    created = api.create(title="doomed")
    task_id = created["id"]
    renamed = api.patch(f"/tasks/{task_id}", json={"title": "doomed, renamed"}).json()
    assert api.delete(f"/tasks/{task_id}").status_code == 204
    assert api.get(f"/tasks/{task_id}").status_code == 404
    events = _history(api, task_id)
    assert [e["type"] for e in events] == ["TaskCreated", "TaskRenamed", "TaskDeleted"]
    created_at, renamed_at, deleted_at = (_at(e["occurred_at"]) for e in events)

    _assert_state(_travel(api, task_id, version=1), created)
    _assert_state(_travel(api, task_id, version=2), renamed)
    assert _travel(api, task_id, version=3).status_code == 404  # deleted at version 3
    assert _travel(api, task_id, version=4).status_code == 404  # past the current one
    _assert_state(_travel(api, task_id, as_of=renamed_at.isoformat()), renamed)
    before_delete = (deleted_at - ONE_MICROSECOND).isoformat()
    _assert_state(_travel(api, task_id, as_of=before_delete), renamed)
    assert _travel(api, task_id, as_of=deleted_at.isoformat()).status_code == 404
    now = datetime.now(UTC).isoformat()
    assert _travel(api, task_id, as_of=now).status_code == 404
    before_create = (created_at - ONE_MICROSECOND).isoformat()
    assert _travel(api, task_id, as_of=before_create).status_code == 404

    restored = api.post(f"/tasks/{task_id}/restore")
    assert restored.status_code == 200, restored.text
    assert restored.json()["version"] == 4
    _assert_state(_travel(api, task_id, version=4), restored.json())
    assert _travel(api, task_id, version=3).status_code == 404
    _assert_state(_travel(api, task_id, version=2), renamed)
    _assert_state(_travel(api, task_id, as_of=datetime.now(UTC).isoformat()), restored.json())


def test_time_travel_refuses_bad_parameters(api: Api) -> None:
    task_id = api.create(title="params")["id"]
    moment = datetime.now(UTC).isoformat()
    for params in (
        {"version": "0"},
        {"version": "-1"},
        {"version": "abc"},
        {"version": "1.5"},
        {"version": "1.0"},  # Litestar would take it as 1
        {"version": "1e0"},
        {"version": ""},
        {"as_of": "garbage"},
        {"as_of": "2026-13-01T00:00:00Z"},
        {"as_of": "2026-01-01T10:00:00"},  # no offset
        {"as_of": "2026-01-01T10:00:00.123456"},  # no offset
        {"version": "1", "as_of": moment},
        # Not RFC 3339, though Litestar's parsing takes them: seconds since the epoch (in
        # the task's life, and before it), an offset without its colon, and a "+" that the
        # query's decoding turned into a space.
        {"as_of": "4102444800"},
        {"as_of": "4102444800.5"},
        {"as_of": "1e10"},
        {"as_of": "1700000000"},
        {"as_of": "2100-01-01T00:00:00+0100"},
        {"as_of": "2100-01-01T00:00:00 01:00"},
        {"as_of": "null"},  # Litestar would take it as no as_of
        {"version": "1", "as_of": "null"},
    ):
        _assert_problem(_travel(api, task_id, **params), 400)
    for params in ({"as_of": "4102444800"}, {"version": "1", "as_of": moment}):
        answer = _travel(api, task_id, **params)
        assert [error["field"] for error in answer.json()["errors"]] == list(params), params
    # The good forms of the same, for contrast (RFC 3339 allows "t", "z" and a space).
    assert _travel(api, task_id, version="1").status_code == 200
    for good in (moment, "2100-01-01t00:00:00z", "2100-01-01 00:00:00-01:00"):
        assert _travel(api, task_id, as_of=good).status_code == 200, good


def test_time_travel_never_shows_another_users_task(api: Api, other_api: Api) -> None:
    task_id = api.create(title="mine")["id"]
    moment = datetime.now(UTC).isoformat()
    assert _travel(api, task_id, version=1).status_code == 200
    for params in ({"version": 1}, {"as_of": moment}):
        response = _travel(other_api, task_id, **params)
        _assert_problem(response, 404)
        # Exactly as an id that does not exist.
        unknown = _travel(other_api, str(uuid.uuid4()), **params)
        _assert_problem(unknown, 404)
        assert response.json() == unknown.json()
        _assert_problem(_travel(api, "not-a-uuid", **params), 404)


# --- 2. the feed -----------------------------------------------------------------------------


def test_feed_shows_the_users_events_in_commit_order(api: Api, other_api: Api) -> None:
    one = api.create(title="one")["id"]
    theirs = other_api.create(title="theirs")["id"]
    two = api.create(title="two", priority="low", tags=["x"], due_date="2031-02-03")["id"]
    assert api.patch(f"/tasks/{one}", json={"title": "one!", "priority": "high"}).status_code == 200
    assert other_api.patch(f"/tasks/{theirs}", json={"title": "theirs!"}).status_code == 200
    assert api.delete(f"/tasks/{two}").status_code == 204

    page = _feed(api)
    items = page["items"]
    assert [(e["task_id"], e["version"], e["type"]) for e in items] == [
        (one, 1, "TaskCreated"),
        (two, 1, "TaskCreated"),
        (one, 2, "TaskRenamed"),
        (one, 3, "TaskPriorityChanged"),
        (two, 2, "TaskDeleted"),
    ]
    assert all(set(e) == EVENT_KEYS for e in items)
    assert [e["data"] for e in items] == [
        {"title": "one", "description": "", "priority": "medium", "due_date": None, "tags": []},
        {
            "title": "two",
            "description": "",
            "priority": "low",
            "due_date": "2031-02-03",
            "tags": ["x"],
        },
        {"title": "one!"},
        {"priority": "high"},
        {},
    ]
    positions = [e["position"] for e in items]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert page["next_position"] == positions[-1]
    # The feed and each task's history show the same events.
    for task_id in (one, two):
        assert [e for e in items if e["task_id"] == task_id] == _history(api, task_id)

    # The other user sees only their own two events.
    theirs_page = _feed(other_api)
    assert [(e["task_id"], e["version"]) for e in theirs_page["items"]] == [
        (theirs, 1),
        (theirs, 2),
    ]
    assert not set(positions) & {e["position"] for e in theirs_page["items"]}

    # Paging with after/limit walks the same events, once each.
    walked: list[dict[str, Any]] = []
    after = 0
    for _ in range(10):
        chunk = _feed(api, after=after, limit=2)
        assert len(chunk["items"]) <= 2
        if not chunk["items"]:
            assert chunk["next_position"] == after
            break
        assert chunk["next_position"] == chunk["items"][-1]["position"]
        walked += chunk["items"]
        after = chunk["next_position"]
    assert walked == items
    assert _feed(api, after=positions[2]) == {"items": items[3:], "next_position": positions[-1]}
    # after a position between two of the user's (another user's event sits there).
    assert _feed(api, after=positions[1] - 1)["items"] == items[1:]
    assert _feed(api, after=positions[-1]) == {"items": [], "next_position": positions[-1]}
    far = positions[-1] + 1_000_000
    assert _feed(api, after=far) == {"items": [], "next_position": far}
    # A user with no events at all.
    stranger = Api(api.client, _new_user())
    assert _feed(stranger) == {"items": [], "next_position": 0}
    assert _feed(stranger, after=5) == {"items": [], "next_position": 5}


def test_feed_limit_default_and_bounds(api: Api) -> None:
    task_id = api.create(title="t0")["id"]
    for i in range(1, 51):  # two events each: 1 + 100 = 101 events
        response = api.patch(f"/tasks/{task_id}", json={"title": f"t{i}", "description": f"d{i}"})
        assert response.status_code == 200, response.text
    everything = _feed(api, limit=1000)
    assert len(everything["items"]) == 101
    assert [e["version"] for e in everything["items"]] == list(range(1, 102))

    default = _feed(api)
    assert default["items"] == everything["items"][:100]
    assert default["next_position"] == everything["items"][99]["position"]
    rest = _feed(api, after=default["next_position"])
    assert rest == {
        "items": everything["items"][100:],
        "next_position": everything["next_position"],
    }
    one = _feed(api, limit=1)
    assert one == {
        "items": everything["items"][:1],
        "next_position": everything["items"][0]["position"],
    }
    assert _feed(api, limit=100)["items"] == default["items"]

    for params in (
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "-5"},
        {"limit": "abc"},
        {"after": "-1"},
        {"after": "abc"},
        {"after": "1.5"},
        {"after": "1.0"},  # Litestar would take it as 1
        {"limit": "1e2"},
        {"after": "01"},
        {"after": "9223372036854775808"},  # past a bigint, which positions are
        {"after": "99999999999999999999"},
    ):
        answer = api.get("/events", params=params)
        _assert_problem(answer, 400)
        assert [error["field"] for error in answer.json()["errors"]] == list(params)
    last = {"after": "9223372036854775807"}
    assert _feed(api, **last) == {"items": [], "next_position": 9223372036854775807}
    for params in ({"after": "1.0"}, {"after": "-0"}, {"after": "9223372036854775808"}):
        _assert_problem(api.get("/events/stream", params=params), 400)


# A description of 10,000 control characters, which JSON writes as six bytes each: its event's
# data is 60,019 bytes ({"description": "...\u0001..."}); the TaskCreated of `big` is 87.
# eventstore.PAGE_BYTES (1 MiB) is passed after 17 such events: the bytes before event
# version 19 are 87 + 17 * 60,019 = 1,020,410, before version 20 1,080,429.
_BIG_EVENT = 60_019


def _task_with_big_events(post: Callable[..., Any], patch: Callable[..., Any], count: int) -> str:
    response = post("/tasks", json={"title": "big"})
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    for i in range(count):
        description = chr(1 + i % 2) * 10_000  # each differs from the last: one event each
        response = patch(f"/tasks/{task_id}", json={"description": description})
        assert response.status_code == 200, response.text
    return task_id


def test_pages_of_big_events_stop_after_a_mebibyte(api: Api, database_url: str) -> None:
    task_id = _task_with_big_events(api.post, api.patch, 20)  # versions 1 to 21
    with psycopg.connect(database_url) as conn:
        sizes = conn.execute(
            "SELECT octet_length(data::text) FROM events WHERE task_id = %s ORDER BY version",
            (task_id,),
        ).fetchall()
    assert [size for (size,) in sizes] == [87] + [_BIG_EVENT] * 20
    assert eventstore.PAGE_BYTES == 1 << 20

    # History: the page stops at version 19, though the limit allows 200; its cursor goes on.
    first = api.get(f"/tasks/{task_id}/history", params={"limit": 200}).json()
    assert [e["version"] for e in first["items"]] == list(range(1, 20))
    assert first["items"][5]["data"] == {"description": chr(1 + 4 % 2) * 10_000}
    rest = api.get(
        f"/tasks/{task_id}/history", params={"limit": 200, "cursor": first["next_cursor"]}
    ).json()
    assert [e["version"] for e in rest["items"]] == [20, 21]
    assert rest["next_cursor"] is None
    # A limit that ends the page first still says whether more follow.
    assert api.get(f"/tasks/{task_id}/history", params={"limit": 19}).json() == first
    third = api.get(
        f"/tasks/{task_id}/history", params={"limit": 1, "cursor": first["next_cursor"]}
    )
    assert [e["version"] for e in third.json()["items"]] == [20]
    assert third.json()["next_cursor"] is not None

    # The feed: the same cut, and polling after next_position goes on from it.
    feed = _feed(api, limit=1000)
    assert [e["version"] for e in feed["items"]] == list(range(1, 20))
    assert feed["next_position"] == feed["items"][-1]["position"]
    following = _feed(api, after=feed["next_position"], limit=1000)
    assert [e["version"] for e in following["items"]] == [20, 21]
    assert feed["items"] + following["items"] == first["items"] + rest["items"]
    assert _feed(api, after=following["next_position"])["items"] == []


# --- a real server -----------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    # The workers are in the session the server was started in: make sure none outlives it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def _serve(database_url: str, folder: Path, heartbeat: float) -> Iterator[str]:
    """`todo-cqrs serve --workers 2` on a free loopback port; its base URL."""
    (folder / "metrics").mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "TODO_JWT_SECRET": JWT_SECRET,
        "TODO_SSE_HEARTBEAT": str(heartbeat),
        "TODO_LOG_LEVEL": "WARNING",
        "TODO_DATA_DIR": str(folder / "data"),
        "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
    }
    port = db.free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "todo_cqrs.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "2"]
    with open(folder / "serve.log", "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 30
            with httpx.Client(base_url=base, timeout=1.0, trust_env=False) as probe:
                while True:
                    if process.poll() is not None:
                        pytest.fail(f"serve exited: {(folder / 'serve.log').read_text()[-3000:]}")
                    if time.monotonic() > deadline:
                        pytest.fail(f"serve not up in 30 s: {(folder / 'serve.log').read_text()}")
                    try:
                        if probe.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.1)
            yield base
        finally:
            _stop(process)


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service with a heartbeat every 0.5 s."""
    with _serve(database_url, tmp_path_factory.mktemp("serve"), 0.5) as base:
        yield base


@pytest.fixture(scope="module")
def quiet_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service with a heartbeat every 15 s (the most it takes): what its streams
    deliver sooner, a notification woke them for."""
    with _serve(database_url, tmp_path_factory.mktemp("serve"), 15) as base:
        yield base


def _client(base: str, user: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers=_auth(user), timeout=10.0, trust_env=False)


def _run_threads(targets: list[Callable[[], None]], timeout: float) -> None:
    """Run each target in a thread; re-raise the first failure; bounded in time."""
    errors: list[BaseException] = []

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as error:
                errors.append(error)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running after the time limit"
    if errors:
        raise errors[0]


def test_a_command_waits_for_the_users_append_lock(api: Api, database_url: str) -> None:
    """Why the feed never skips: a transaction that has drawn an event position holds the
    user's lock until it ends, and a command of the same user waits for it, so positions
    become visible in order. (The poller test below shows the effect, but only by chance.)"""
    with psycopg.connect(database_url) as held:
        held.execute(eventstore.LOCK_USER, {"user_id": api.user})
        held.execute("SELECT nextval(pg_get_serial_sequence('events', 'position'))")  # drawn
        answers: list[int] = []
        command = threading.Thread(
            target=lambda: answers.append(api.post("/tasks", json={"title": "x"}).status_code)
        )
        command.start()
        command.join(1.0)
        assert command.is_alive(), "the command did not wait for the user's lock"
        other = Api(api.client, f"user-{uuid.uuid4()}")
        assert other.post("/tasks", json={"title": "y"}).status_code == 201  # not blocked
        held.rollback()
    command.join(10)
    assert answers == [201]
    assert [e["data"]["title"] for e in _feed(api)["items"]] == ["x"]


def test_feed_poller_never_misses_an_event(server: str, database_url: str) -> None:
    user, others = _new_user(), [_new_user(), _new_user()]
    deadline = time.monotonic() + 30
    writers_done = threading.Event()
    seen: list[dict[str, Any]] = []
    polls = [0]

    def writer(who: str, commands: int, tag: str) -> Callable[[], None]:
        def run() -> None:
            with _client(server, who) as http:
                task_id = ""
                for i in range(commands):
                    assert time.monotonic() < deadline, "writer ran out of time"
                    step = i % 4
                    if step == 0:  # TaskCreated
                        response = http.post("/tasks", json={"title": f"{tag}-{i}", "tags": [tag]})
                        assert response.status_code == 201, response.text
                        task_id = response.json()["id"]
                        continue
                    if step == 1:  # TaskRenamed, TaskPriorityChanged
                        response = http.patch(
                            f"/tasks/{task_id}", json={"title": f"{tag}-{i}!", "priority": "high"}
                        )
                    elif step == 2:  # TaskCompleted
                        response = http.post(f"/tasks/{task_id}/complete")
                    else:  # TaskDescriptionChanged, TaskReopened
                        response = http.patch(
                            f"/tasks/{task_id}", json={"description": f"d{i}", "completed": False}
                        )
                    assert response.status_code == 200, response.text

        return run

    def poller() -> None:
        with _client(server, user) as http:
            after = 0
            while time.monotonic() < deadline:
                finishing = writers_done.is_set()  # read before the request is sent
                response = http.get("/events", params={"after": after, "limit": 37})
                assert response.status_code == 200, response.text
                page = response.json()
                polls[0] += 1
                items = page["items"]
                assert len(items) <= 37
                assert page["next_position"] == (items[-1]["position"] if items else after)
                seen.extend(items)
                after = page["next_position"]
                if not items:
                    if finishing:
                        return  # every writer had its answers before this empty page
                    time.sleep(0.002)
            raise AssertionError("the poller ran out of time")

    writers = [writer(user, 40, f"w{n}") for n in range(6)]
    writers += [writer(other, 20, f"o{n}") for n, other in enumerate(others)]
    poll_errors: list[BaseException] = []

    def poll_and_record() -> None:
        try:
            _run_threads([poller], 32)
        except BaseException as error:
            poll_errors.append(error)

    poll_thread = threading.Thread(target=poll_and_record, daemon=True)
    poll_thread.start()
    try:
        _run_threads(writers, 28)
    finally:
        writers_done.set()
        poll_thread.join(max(0.0, deadline + 3 - time.monotonic()))
    assert not poll_thread.is_alive()
    if poll_errors:
        raise poll_errors[0]

    # 6 writers x 10 rounds x (1 + 2 + 1 + 2) events.
    assert len(seen) == 360
    positions = [e["position"] for e in seen]
    assert all(a < b for a, b in itertools.pairwise(positions)), "out of order"
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT position, task_id::text, version, type FROM events"
            " WHERE user_id = %s ORDER BY position",
            (user,),
        ).fetchall()
    assert [(e["position"], e["task_id"], e["version"], e["type"]) for e in seen] == [
        tuple(row) for row in rows
    ]
    # Each task's versions, as the feed showed them, are 1..6 in order.
    by_task: dict[str, list[int]] = {}
    for event in seen:
        by_task.setdefault(event["task_id"], []).append(event["version"])
    assert len(by_task) == 60
    assert all(versions == [1, 2, 3, 4, 5, 6] for versions in by_task.values())
    assert polls[0] >= 2


# --- 3. the stream -----------------------------------------------------------------------------


@dataclass
class Message:
    id: str | None = None
    data: str | None = None
    comments: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    arrived: float = 0.0

    @property
    def heartbeat(self) -> bool:
        return bool(self.comments) and self.id is None and self.data is None and not self.other


class SSE:
    """Reads Server-Sent Events messages off a streaming httpx response, within a deadline."""

    def __init__(self, response: httpx.Response, seconds: float) -> None:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        self.lines = response.iter_lines()
        self.deadline = time.monotonic() + seconds
        self.last_id: str | None = None  # an EventSource's "last event ID"

    def next(self) -> Message:
        """The next message that is an event or a comment. A message of only an id is none
        (the SSE spec dispatches no event for it): it sets `last_id`, as every id does."""
        while True:
            message = self._next()
            if message.id is not None:
                self.last_id = message.id
            if message.data is not None or message.comments or message.other:
                return message

    def _next(self) -> Message:
        message = Message()
        data: list[str] = []
        for line in self.lines:
            assert time.monotonic() < self.deadline, "the stream test ran out of time"
            if line == "":
                if message.id is None and not data and not message.comments and not message.other:
                    continue
                message.data = "\n".join(data) if data else None
                message.arrived = time.monotonic()
                return message
            if line.startswith(":"):
                message.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                message.id = value
            elif name == "data":
                data.append(value)
            else:
                message.other.append(line)
        raise AssertionError("the stream ended")

    def events(self, count: int) -> list[Message]:
        """The next `count` events, skipping heartbeats."""
        found: list[Message] = []
        while len(found) < count:
            message = self.next()
            if not message.heartbeat:
                found.append(message)
        return found

    def events_until_heartbeat(self) -> list[Message]:
        found: list[Message] = []
        while not (message := self.next()).heartbeat:
            found.append(message)
        return found


def _stream(http: httpx.Client, **kwargs: Any) -> Any:
    return http.stream("GET", "/events/stream", **kwargs)


def _events_of(messages: list[Message]) -> list[dict[str, Any]]:
    events = []
    for message in messages:
        assert message.data is not None and message.id is not None, message
        event = json.loads(message.data)
        assert message.id == str(event["position"])
        events.append(event)
    return events


def test_stream_delivers_events_as_they_commit(server: str) -> None:
    user = _new_user()
    with _client(server, user) as http:
        with _stream(http) as response:
            sse = SSE(response, 15)
            assert sse.next().heartbeat  # the stream is open and positioned at the newest event

            def commands() -> None:
                with _client(server, user) as writer:
                    task_id = writer.post("/tasks", json={"title": "streamed"}).json()["id"]
                    writer.patch(f"/tasks/{task_id}", json={"title": "streamed, renamed"})
                    writer.post(f"/tasks/{task_id}/complete")
                    assert writer.delete(f"/tasks/{task_id}").status_code == 204

            _run_threads([commands], 10)
            messages = sse.events(4)
            assert sse.events_until_heartbeat() == []  # and nothing else
        feed = _feed_of(http)
        assert [e["type"] for e in feed] == [
            "TaskCreated",
            "TaskRenamed",
            "TaskCompleted",
            "TaskDeleted",
        ]
        assert [m.id for m in messages] == [str(e["position"]) for e in feed]
        assert [json.loads(m.data or "") for m in messages] == feed

        positions = [e["position"] for e in feed]
        # Reconnecting with Last-Event-ID: exactly the events after it, then quiet.
        for index, position in enumerate(positions):
            headers = {"Last-Event-ID": str(position)}
            with _stream(http, headers=headers) as response:
                sse = SSE(response, 10)
                assert _events_of(sse.events_until_heartbeat()) == feed[index + 1 :]
        with _stream(http, headers={"Last-Event-ID": "0"}) as response:
            assert _events_of(SSE(response, 10).events_until_heartbeat()) == feed
        # ?after=P does the same.
        with _stream(http, params={"after": positions[0]}) as response:
            assert _events_of(SSE(response, 10).events_until_heartbeat()) == feed[1:]
        # With neither, the stream starts at the newest event: the past is not replayed.
        with _stream(http) as response:
            sse = SSE(response, 10)
            assert sse.next().heartbeat
            # Its first message says where (an id, no event), so that a client that leaves
            # before any event comes back with it as Last-Event-ID...
            assert sse.last_id == str(positions[-1])
        with _client(server, user) as writer:
            writer.post("/tasks", json={"title": "while away"})
        # ...and gets what was committed meanwhile.
        with _stream(http, headers={"Last-Event-ID": str(positions[-1])}) as response:
            missed = _events_of(SSE(response, 10).events_until_heartbeat())
        assert [e["data"]["title"] for e in missed] == ["while away"]


def _feed_of(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.get("/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_stream_heartbeat_when_nothing_happens(server: str) -> None:
    with _client(server, _new_user()) as http:
        started = time.monotonic()
        with _stream(http) as response:
            sse = SSE(response, 10)
            messages = [sse.next() for _ in range(4)]
    assert all(m.heartbeat for m in messages)
    assert all(m.comments == ["heartbeat"] for m in messages)
    arrivals = [started] + [m.arrived for m in messages]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # TODO_SSE_HEARTBEAT=0.5: each comes about half a second after the previous one (and
    # surely not after the default 10 s); a little slack for a loaded machine.
    assert all(gap < 1.2 for gap in gaps), gaps


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1.5", b"1" * 19, b"\xb2", b"\xb9\xb2"])
def test_malformed_last_event_id_answers_400(server: str, value: bytes) -> None:
    """Superscript digits (bytes ² and ¹² as Latin-1) pass str.isdigit() but not int(): they
    answered 500. A real server: the test client would re-encode the bytes as UTF-8."""
    with _client(server, _new_user()) as http:
        response = http.get("/events/stream", headers={"Last-Event-ID": value})
    assert assert_problem(response, 400)["detail"] == "Last-Event-ID must be an event position."


def test_stream_heartbeat_keeps_time_while_wake_ups_bring_nothing(server: str) -> None:
    """A stream positioned past the user's newest event wakes up at each of their commands
    but has nothing to send; the heartbeats must still come on time (each used to wait a
    whole period again after every wake-up, so none came while commands came faster)."""
    user = _new_user()
    writing = threading.Event()
    statuses: list[int] = []

    def commands() -> None:  # one every 0.3 s for 3 s; the heartbeat is every 0.5 s
        with _client(server, user) as writer:
            writing.set()
            for i in range(10):
                statuses.append(writer.post("/tasks", json={"title": f"wake {i}"}).status_code)
                time.sleep(0.3)

    with _client(server, user) as http, _stream(http, params={"after": 10**15}) as response:
        sse = SSE(response, 10)
        assert sse.next().heartbeat
        writer = threading.Thread(target=commands, daemon=True)
        writer.start()
        writing.wait(5)
        started = time.monotonic()
        messages = [sse.next() for _ in range(4)]
        writer.join(10)
    assert all(m.heartbeat for m in messages)
    arrivals = [started] + [m.arrived for m in messages]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap < 1.2 for gap in gaps), gaps
    assert statuses == [201] * 10  # the commands did wake the stream meanwhile


def test_stream_shows_only_the_users_own_events(server: str) -> None:
    alice, bob = _new_user(), _new_user()
    with _client(server, alice) as as_alice, _client(server, bob) as as_bob:
        with _stream(as_alice) as alice_response, _stream(as_bob) as bob_response:
            alice_stream = SSE(alice_response, 15)
            bob_stream = SSE(bob_response, 15)
            assert alice_stream.next().heartbeat
            assert bob_stream.next().heartbeat
            for i in range(3):
                assert as_bob.post("/tasks", json={"title": f"bob {i}"}).status_code == 201
            assert as_alice.post("/tasks", json={"title": "alice"}).status_code == 201
            alice_seen = _events_of(alice_stream.events(1) + alice_stream.events_until_heartbeat())
            bob_seen = _events_of(bob_stream.events(3) + bob_stream.events_until_heartbeat())
        assert alice_seen == _feed_of(as_alice)
        assert [e["data"]["title"] for e in alice_seen] == ["alice"]
        assert bob_seen == _feed_of(as_bob)
        assert [e["data"]["title"] for e in bob_seen] == ["bob 0", "bob 1", "bob 2"]


def _until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def _registered(database_url: str, user: str) -> int:
    """How many processes have the user registered for notifications (live rows)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM event_listeners WHERE user_id = %s AND expires_at > now()",
            (user,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_stream_is_woken_by_its_users_commands_while_open_and_forgotten_after(
    quiet_server: str, database_url: str
) -> None:
    """With a 15 s heartbeat, events that arrive within 5 s came by notification: the
    stream's process registered its user, and commands of that user notify."""
    user = _new_user()
    with _client(quiet_server, user) as http:
        with _stream(http) as response:
            sse = SSE(response, 5)
            _until(lambda: _registered(database_url, user) == 1, 5, "the stream registers")
            with _client(quiet_server, user) as writer:  # any worker: the other one, often
                task_id = writer.post("/tasks", json={"title": "woken"}).json()["id"]
                writer.patch(f"/tasks/{task_id}", json={"title": "woken again"})
            events = _events_of(sse.events(2))
        assert [e["data"]["title"] for e in events] == ["woken", "woken again"]
        _until(lambda: _registered(database_url, user) == 0, 5, "the closed stream's user goes")


def _notifications(conn: psycopg.Connection[Any], expected: int) -> list[str]:
    """The payloads that reach a LISTEN connection: the first `expected` of them (waiting up
    to 5 s for them), then any more that come within half a second."""
    payloads = [note.payload for note in conn.notifies(timeout=5, stop_after=expected)]
    return payloads + [note.payload for note in conn.notifies(timeout=0.5)]


def test_commands_notify_only_users_that_a_live_registration_names(
    server: str, database_url: str
) -> None:
    listened, unheard, expired = _new_user(), _new_user(), _new_user()
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {eventstore.CHANNEL}")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO event_listeners (user_id, listener, expires_at) VALUES"
                " (%s, 'test', now() + interval '1 minute'), (%s, 'test', now() - interval '1 s')",
                (listened, expired),
            )
        for user in (unheard, expired, listened, unheard):
            with _client(server, user) as http:
                assert http.post("/tasks", json={"title": "said"}).status_code == 201
        assert _notifications(listener, 1) == [listened]


def test_the_notify_check_notifies_always_where_it_could_miss_a_registration(
    database_url: str,
) -> None:
    """At REPEATABLE READ (a server's default can be) the check would see registrations only
    as of its statement's start, from before the user's lock: there it always notifies."""
    user = _new_user()
    check = "SELECT notify_event_listeners(%s, %s)"
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {eventstore.CHANNEL}")
        with psycopg.connect(database_url) as conn:
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            conn.execute(check, (eventstore.CHANNEL, user))
            conn.commit()
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.execute(check, (eventstore.CHANNEL, user))
            conn.commit()
        assert _notifications(listener, 1) == [user]


def test_registrations_are_renewed_pruned_and_forgotten_when_the_process_stops(
    database_url: str,
) -> None:
    """`renew` pushes a process's rows out by the TTL, `prune_listeners` removes only the
    expired rows (of processes that died), and `close` removes every row of its process, a
    user whose forget never ran included, and no row of another process."""
    mine, alive, dead = _new_user(), _new_user(), _new_user()

    def expiry(listener: str, user: str) -> float | None:
        """Seconds until the row expires; None when there is no row."""
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM expires_at - now())::float FROM event_listeners"
                " WHERE listener = %s AND user_id = %s",
                (listener, user),
            ).fetchone()
        return None if row is None else float(row[0])

    async def scenario() -> None:
        signal = eventstore.NewEventSignal(database_url)
        async with AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False) as pool:
            await pool.wait()
            signal.subscribe(mine)  # a stream that never unsubscribes: its forget never runs
            await signal.register(pool, mine)
            async with pool.connection() as conn:
                await conn.execute(
                    "UPDATE event_listeners SET expires_at = now() + interval '1 s'"
                    " WHERE listener = %s",
                    (signal.listener,),
                )
                await conn.execute(
                    "INSERT INTO event_listeners (user_id, listener, expires_at) VALUES"
                    " (%s, 'another', now() + interval '1 minute'),"
                    " (%s, 'a dead one', now() - interval '1 s')",
                    (alive, dead),
                )
            left = expiry(signal.listener, mine)
            assert left is not None and left < 2
            await signal.renew(pool)
            left = expiry(signal.listener, mine)
            assert left is not None and left > eventstore.LISTENER_TTL - 5
            assert await eventstore.prune_listeners(pool) >= 1
            assert expiry("a dead one", dead) is None
            assert expiry(signal.listener, mine) is not None
            await signal.close(pool)
        assert expiry(signal.listener, mine) is None
        assert expiry("another", alive) is not None

    asyncio.run(scenario())


def test_a_stream_that_registers_while_its_user_is_being_forgotten_stays_registered(
    database_url: str,
) -> None:
    """The user's last stream here closed and its forget has sent its DELETE when a new
    stream of the user registers. The server may run the two statements in either order;
    here it is made to run the registration first: the DELETE waits on a row lock (FOR KEY
    SHARE) that the registration's upsert does not conflict with. The new stream must
    still be registered afterwards, or its events would wait for a heartbeat or a renewal."""
    user = _new_user()

    async def scenario() -> None:
        signal = eventstore.NewEventSignal(database_url)
        async with (
            AsyncConnectionPool(database_url, min_size=2, max_size=4, open=False) as pool,
            await psycopg.AsyncConnection.connect(database_url) as holder,
            await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watcher,
        ):
            await pool.wait()
            first = signal.subscribe(user)
            await signal.register(pool, user)
            await holder.execute(
                "SELECT FROM event_listeners WHERE user_id = %s AND listener = %s FOR KEY SHARE",
                (user, signal.listener),
            )
            signal.unsubscribe(pool, user, first)

            async def deletes(condition: str) -> int:
                cur = await watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    f" AND query LIKE 'DELETE FROM event_listeners%%' AND {condition}"
                )
                row = await cur.fetchone()
                assert row is not None
                return int(row[0])

            async def until(condition: str, count: int, what: str) -> None:
                deadline = time.monotonic() + 5
                while await deletes(condition) != count:
                    assert time.monotonic() < deadline, f"not within 5 s: {what}"
                    await asyncio.sleep(0.05)

            await until("wait_event_type = 'Lock'", 1, "the forget's DELETE waits")
            signal.subscribe(user)
            registering = asyncio.create_task(signal.register(pool, user))
            await asyncio.sleep(0.5)  # time enough for an upsert that does not wait
            await holder.commit()
            await asyncio.wait_for(registering, 5)
            await until("state = 'active'", 0, "the forget's DELETE ends")
            assert _registered(database_url, user) == 1
            await signal.close(pool)

    asyncio.run(scenario())


def test_a_stream_reads_after_a_command_that_did_not_see_it_register(
    quiet_server: str, database_url: str
) -> None:
    """A command that found no registration (here: events written under the user's lock,
    without a NOTIFY) and commits while the stream registers: the stream's first read waits
    for that commit, so the events come at once, not a heartbeat (15 s) later."""
    user = _new_user()
    with _client(quiet_server, user) as http, psycopg.connect(database_url) as command:
        command.execute(eventstore.LOCK_USER, {"user_id": user})
        command.execute(
            "INSERT INTO events (user_id, task_id, version, type, data, occurred_at)"
            " VALUES (%s, %s, 1, 'TaskCreated', %s, now())",
            (user, uuid.uuid4(), '{"title": "in flight", "description": "",'
             ' "priority": "medium", "due_date": null, "tags": []}'),
        )  # fmt: skip
        with _stream(http) as response:
            sse = SSE(response, 5)

            def registration_waits() -> bool:
                # The user's advisory lock (a bigint key: classid holds its high half, objid
                # its low one) in this database, asked for and not granted.
                with psycopg.connect(database_url) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND NOT granted AND objsubid = 1 AND database ="
                        " (SELECT oid FROM pg_database WHERE datname = current_database())"
                        " AND (classid::bigint << 32 | objid::bigint) = hashtextextended(%s, 0)",
                        (user,),
                    ).fetchone()
                return row == (1,)

            _until(registration_waits, 5, "the stream's registration waits on the user's lock")
            command.commit()
            events = _events_of(sse.events(1))
        assert [e["data"]["title"] for e in events] == ["in flight"]


def test_stream_goes_on_past_a_page_cut_by_its_bytes(server: str) -> None:
    user = _new_user()
    with _client(server, user) as http:
        _task_with_big_events(http.post, http.patch, 20)  # 21 events; pages cut at 19
        feed = _feed_of(http)
        feed += http.get("/events", params={"after": feed[-1]["position"]}).json()["items"]
        assert len(feed) == 21
        # All of them before the first heartbeat: the stream reads on at once after a page
        # cut short, rather than wait for the next wake-up.
        with _stream(http, headers={"Last-Event-ID": "0"}) as response:
            assert _events_of(SSE(response, 10).events_until_heartbeat()) == feed


# --- 4. evolving events ------------------------------------------------------------------------


def test_version_1_task_created_is_upcast_everywhere(
    client: TestClient[Any], api: Api, database_url: str
) -> None:
    bystander = api.create(title="bystander", tags=["keep"], due_date="2030-05-06")
    legacy = Api(client, _new_user())
    task_id = str(uuid.uuid4())
    created_at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    renamed_at = created_at + timedelta(seconds=90)
    v1_data = {"title": "legacy", "description": "from version 1", "priority": "high"}
    with psycopg.connect(database_url) as conn:
        insert = (
            "INSERT INTO events (user_id, task_id, version, type, data, schema_version,"
            " occurred_at) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s) RETURNING position"
        )
        rows = [
            (legacy.user, task_id, 1, "TaskCreated", json.dumps(v1_data), 1, created_at),
            (legacy.user, task_id, 2, "TaskRenamed", '{"title": "legacy, renamed"}', 1, renamed_at),
        ]
        positions = [conn.execute(insert, row).fetchone()[0] for row in rows]  # type: ignore[index]

    upcast = {**v1_data, "due_date": None, "tags": []}
    expected_events = [
        {
            "position": positions[0],
            "task_id": task_id,
            "version": 1,
            "type": "TaskCreated",
            "data": upcast,
            "occurred_at": created_at,
            "meta": {"request_id": None, "idempotency_key": None},
        },
        {
            "position": positions[1],
            "task_id": task_id,
            "version": 2,
            "type": "TaskRenamed",
            "data": {"title": "legacy, renamed"},
            "occurred_at": renamed_at,
            "meta": {"request_id": None, "idempotency_key": None},
        },
    ]

    def parsed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**e, "occurred_at": _at(e["occurred_at"])} for e in events]

    # History and the feed.
    assert parsed(_history(legacy, task_id)) == expected_events
    feed = _feed(legacy)
    assert parsed(feed["items"]) == expected_events
    assert feed["next_position"] == positions[1]

    # Time travel.
    at_1 = {
        "id": task_id,
        "title": "legacy",
        "description": "from version 1",
        "completed": False,
        "priority": "high",
        "due_date": None,
        "tags": [],
        "version": 1,
        "created_at": created_at,
        "updated_at": created_at,
        "completed_at": None,
    }
    at_2 = {**at_1, "title": "legacy, renamed", "version": 2, "updated_at": renamed_at}
    for params, expected in (
        ({"version": 1}, at_1),
        ({"version": 2}, at_2),
        ({"as_of": created_at.isoformat()}, at_1),
        ({"as_of": (renamed_at - ONE_MICROSECOND).isoformat()}, at_1),
        ({"as_of": renamed_at.isoformat()}, at_2),
    ):
        response = legacy.get(f"/tasks/{task_id}", params=params)
        assert response.status_code == 200, (params, response.text)
        assert _with_times(response.json()) == expected
        assert response.headers["etag"] == f'"{expected["version"]}"'
    assert legacy.get(f"/tasks/{task_id}", params={"version": 3}).status_code == 404

    # The projection knows nothing of events written behind its back until a rebuild.
    assert legacy.get(f"/tasks/{task_id}").status_code == 404

    with psycopg.connect(database_url) as conn:
        event_count, task_count = conn.execute(
            "SELECT count(*), count(DISTINCT (user_id, task_id)) FROM events"
        ).fetchone()  # type: ignore[misc]
    # `todo-cqrs rebuild`, the command line of the contract, against this run's database.
    env = {**os.environ, "DATABASE_URL": database_url, "TODO_JWT_SECRET": JWT_SECRET}
    rebuilt = subprocess.run(
        [sys.executable, "-m", "todo_cqrs.cli", "rebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    summary = re.search(r"rebuilt ([\d,]+) tasks from ([\d,]+) events", rebuilt.stdout)
    assert summary is not None, rebuilt.stdout
    assert int(summary[1].replace(",", "")) == task_count
    assert int(summary[2].replace(",", "")) == event_count

    response = legacy.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    assert _with_times(response.json()) == at_2
    assert response.headers["etag"] == '"2"'
    listed = legacy.get("/tasks")
    assert listed.status_code == 200
    assert [_with_times(t) for t in listed.json()["items"]] == [at_2]
    # The rebuilt projection holds the other tasks exactly as the commands left them.
    assert api.get(f"/tasks/{bystander['id']}").json() == bystander
    # And the task takes new commands on top of its upcast past.
    response = legacy.patch(f"/tasks/{task_id}", json={"tags": ["now"]})
    assert response.status_code == 200, response.text
    assert _with_times(response.json())["tags"] == ["now"]
    assert response.json()["version"] == 3


# --- 5. meta -------------------------------------------------------------------------------------


def test_history_and_feed_carry_the_request_meta(api: Api) -> None:
    headers = {"X-Request-ID": "my-req-1", "Idempotency-Key": "k-1"}
    response = api.post("/tasks", json={"title": "with meta"}, headers=headers)
    assert response.status_code == 201, response.text
    assert response.headers["x-request-id"] == "my-req-1"
    task_id = response.json()["id"]
    expected_meta = {"request_id": "my-req-1", "idempotency_key": "k-1"}
    assert [e["meta"] for e in _history(api, task_id)] == [expected_meta]
    assert [e["meta"] for e in _feed(api)["items"]] == [expected_meta]

    # A replay appends nothing.
    replay = api.post("/tasks", json={"title": "with meta"}, headers={"Idempotency-Key": "k-1"})
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == response.json()
    assert len(_feed(api)["items"]) == 1

    # Two events from one request share its meta.
    both = api.patch(
        f"/tasks/{task_id}",
        json={"title": "renamed", "priority": "low"},
        headers={"X-Request-ID": "my-req-2"},
    )
    assert both.status_code == 200, both.text
    # Without the headers: the id the service made up (and answered with), no key.
    plain = api.post(f"/tasks/{task_id}/complete")
    assert plain.status_code == 200
    made_up = plain.headers["x-request-id"]
    # A malformed request id is replaced by a new one.
    odd = api.post(f"/tasks/{task_id}/reopen", headers={"X-Request-ID": "not ok!"})
    assert odd.status_code == 200
    replaced = odd.headers["x-request-id"]
    assert replaced != "not ok!" and replaced != made_up

    expected = [
        expected_meta,
        {"request_id": "my-req-2", "idempotency_key": None},
        {"request_id": "my-req-2", "idempotency_key": None},
        {"request_id": made_up, "idempotency_key": None},
        {"request_id": replaced, "idempotency_key": None},
    ]
    history = _history(api, task_id)
    assert [e["type"] for e in history] == [
        "TaskCreated",
        "TaskRenamed",
        "TaskPriorityChanged",
        "TaskCompleted",
        "TaskReopened",
    ]
    assert [e["meta"] for e in history] == expected
    assert [e["meta"] for e in _feed(api)["items"]] == expected
