"""Contract tests of the read side through the real app: the task list and its filters and
pages, one task with ETag / If-None-Match, and a task's history (API.md, "Queries")."""

from __future__ import annotations

import asyncio
import base64
import secrets
import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg
import pytest
from conftest import Api
from litestar.testing import TestClient
from psycopg.conninfo import make_conninfo
from yoyo import get_backend, read_migrations

from todo_cqrs import db, projection
from todo_cqrs.config import Settings
from todo_cqrs.http import create_app

EVENT_KEYS = {"position", "task_id", "version", "type", "data", "occurred_at", "meta"}


def ts(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None, value
    return moment


def page(api: Any, **params: Any) -> dict[str, Any]:
    response = api.get("/tasks", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"items", "next_cursor"}
    return body


def titles(api: Any, **params: Any) -> list[str]:
    body = page(api, limit=200, **params)
    assert body["next_cursor"] is None
    return [task["title"] for task in body["items"]]


def walk(api: Any, limit: int, between: Any = None, **params: Any) -> list[str]:
    """Every page of the list; `between` runs after each page."""
    ids: list[str] = []
    cursor = None
    for _ in range(1000):
        query = {"limit": limit, **params}
        if cursor is not None:
            query["cursor"] = cursor
        body = page(api, **query)
        assert len(body["items"]) <= limit
        ids += [task["id"] for task in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids
        assert len(body["items"]) == limit
        if between is not None:
            between()
    raise AssertionError("the pages never end")


def newest_first(tasks: list[dict[str, Any]]) -> list[str]:
    ordered = sorted(tasks, key=lambda t: (ts(t["created_at"]), uuid.UUID(t["id"])), reverse=True)
    return [t["id"] for t in ordered]


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert {"type", "title", "status", "detail"} <= set(body)
    return body


# --- GET /tasks: order ------------------------------------------------------------------------


def test_list_is_newest_first(api: Any) -> None:
    created = [api.create(title=f"t{i}") for i in range(5)]
    body = page(api)
    assert body["next_cursor"] is None
    assert [t["title"] for t in body["items"]] == ["t4", "t3", "t2", "t1", "t0"]
    assert body["items"] == [api.get(f"/tasks/{t['id']}").json() for t in reversed(created)]


def test_list_breaks_created_at_ties_by_id_descending(api: Any, database_url: str) -> None:
    created = [api.create(title=f"t{i}") for i in range(7)]
    # Tie the creation times in the projection, which is what the list reads (the column
    # orders, the body is what the answer shows).
    with psycopg.connect(database_url, autocommit=True) as conn:
        updated = conn.execute(
            "UPDATE tasks SET created_at = '2026-01-01T00:00:00Z',"
            " body = jsonb_set(body::jsonb, '{created_at}', '\"2026-01-01T00:00:00Z\"')::text"
            " WHERE user_id = %s AND task_id = ANY(%s)",
            (api.user, [uuid.UUID(t["id"]) for t in created[1:6]]),
        )
        assert updated.rowcount == 5
    items = page(api)["items"]
    expected = newest_first(items)
    assert [t["id"] for t in items] == expected
    tied = [t["id"] for t in items if t["title"] in {"t1", "t2", "t3", "t4", "t5"}]
    assert tied == sorted(tied, key=uuid.UUID, reverse=True)
    # keyset pages across the ties return each task once, in the same order
    assert walk(api, limit=2) == expected
    assert walk(api, limit=1) == expected


def test_list_is_empty_for_a_new_user(api: Any) -> None:
    assert page(api) == {"items": [], "next_cursor": None}


# --- GET /tasks: filters ----------------------------------------------------------------------


def test_filter_completed(api: Any) -> None:
    done = api.create(title="done")
    api.create(title="open")
    api.post(f"/tasks/{done['id']}/complete")
    assert titles(api, completed="true") == ["done"]
    assert titles(api, completed="false") == ["open"]
    assert titles(api) == ["open", "done"]


def test_filter_tag_is_exact_and_case_sensitive(api: Any) -> None:
    api.create(title="lower", tags=["home", "x"])
    api.create(title="upper", tags=["Home"])
    api.create(title="longer", tags=["homework"])
    api.create(title="none")
    assert titles(api, tag="home") == ["lower"]
    assert titles(api, tag="Home") == ["upper"]
    assert titles(api, tag="hom") == []
    assert titles(api, tag="HOME") == []


def test_filter_q_is_a_case_insensitive_substring_of_the_title(api: Any) -> None:
    api.create(title="Buy MILK")
    api.create(title="buy oat milk")
    api.create(title="Bread", description="milk in the description does not count")
    assert titles(api, q="milk") == ["buy oat milk", "Buy MILK"]
    assert titles(api, q="Y mI") == ["Buy MILK"]
    assert titles(api, q="cheese") == []


def _assert_q_folds_case_beyond_ascii(api: Any) -> None:
    api.create(title="Ärger im Büro")
    api.create(title="Straße")
    api.create(title="ΣΊΣΥΦΟΣ")
    api.create(title="plain")
    assert titles(api, q="ärger") == ["Ärger im Büro"]
    assert titles(api, q="BÜRO") == ["Ärger im Büro"]
    assert titles(api, q="STRASSE") == ["Straße"]  # full case folding: ß is ss
    assert titles(api, q="σίσυφος") == ["ΣΊΣΥΦΟΣ"]  # the final sigma too
    assert titles(api, q="Ü") == ["Ärger im Büro"]


def test_filter_q_folds_case_beyond_ascii(api: Any) -> None:
    _assert_q_folds_case_beyond_ascii(api)


def test_filter_q_folds_case_in_a_c_locale_database(server_url: str, settings: Settings) -> None:
    """PostgreSQL's lower() follows the database's locale and, in a C-locale database (the
    embedded server's where LANG is unset), changes only ASCII letters: `q` must not
    depend on it."""
    name = f"todo_cqrs_test_c_locale_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'")
    url = make_conninfo(server_url, dbname=name)
    try:
        db.migrate(url)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT lower('Ä')").fetchone() == ("Ä",)  # as said above
        c_locale = replace(settings, database_url=url, listen_database_url=url)
        with TestClient(app=create_app(c_locale)) as client:  # type: ignore[arg-type]
            _assert_q_folds_case_beyond_ascii(Api(client, f"user-{uuid.uuid4()}"))
    finally:
        db.drop_database(server_url, url)


def test_filter_q_takes_percent_and_underscore_literally(api: Any) -> None:
    api.create(title="100% done")
    api.create(title="100 done")
    api.create(title="a_b")
    api.create(title="axb")
    api.create(title="back\\slash")
    assert titles(api, q="%") == ["100% done"]
    assert titles(api, q="0%") == ["100% done"]
    assert titles(api, q="_") == ["a_b"]
    assert titles(api, q="a_b") == ["a_b"]
    assert titles(api, q="\\") == ["back\\slash"]


def test_filter_due_before_is_strict(api: Any) -> None:
    api.create(title="ninth", due_date="2026-01-09")
    api.create(title="tenth", due_date="2026-01-10")
    api.create(title="eleventh", due_date="2026-01-11")
    api.create(title="undated")
    assert titles(api, due_before="2026-01-10") == ["ninth"]
    assert titles(api, due_before="2026-01-11") == ["tenth", "ninth"]
    assert titles(api, due_before="2026-01-09") == []


def test_filters_combine(api: Any) -> None:
    a = api.create(title="Pay tax", tags=["money"], due_date="2026-04-01")
    api.create(title="Pay rent", tags=["money"], due_date="2026-05-01")
    api.create(title="Pay back", tags=["friends"], due_date="2026-03-01")
    api.post(f"/tasks/{a['id']}/complete")
    assert titles(api, tag="money", q="pay", due_before="2026-06-01", completed="false") == [
        "Pay rent"
    ]
    assert titles(api, tag="money", completed="true") == ["Pay tax"]


# --- GET /tasks: limit and cursor -------------------------------------------------------------


def test_limit_default_is_50(api: Any) -> None:
    for i in range(51):
        api.create(title=f"t{i}")
    body = page(api)
    assert len(body["items"]) == 50
    assert isinstance(body["next_cursor"], str)
    rest = page(api, cursor=body["next_cursor"])
    assert [t["title"] for t in rest["items"]] == ["t0"]
    assert rest["next_cursor"] is None
    assert len(page(api, limit=200)["items"]) == 51


def test_limit_bounds_are_1_and_200(api: Any) -> None:
    api.create(title="a")
    api.create(title="b")
    one = page(api, limit=1)
    assert [t["title"] for t in one["items"]] == ["b"]
    assert one["next_cursor"] is not None
    assert [t["title"] for t in page(api, limit=200)["items"]] == ["b", "a"]


def test_walking_all_pages_returns_every_task_once(api: Any) -> None:
    created = [api.create(title=f"t{i}") for i in range(11)]
    expected = [t["id"] for t in reversed(created)]
    for limit in (1, 3, 5, 11, 12):
        assert walk(api, limit=limit) == expected


def test_pages_are_stable_while_tasks_are_inserted(api: Any) -> None:
    created = [api.create(title=f"t{i}") for i in range(10)]
    expected = [t["id"] for t in reversed(created)]
    seen = walk(api, limit=3, between=lambda: api.create(title="newcomer"))
    assert seen == expected
    assert len(page(api, limit=200)["items"]) == 10 + 3


def test_pages_respect_filters(api: Any) -> None:
    tagged = [api.create(title=f"t{i}", tags=["x"] if i % 2 else []) for i in range(9)]
    expected = [t["id"] for t in reversed(tagged) if t["tags"]]
    assert walk(api, limit=2, tag="x") == expected


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "201"},
        {"limit": "-1"},
        {"limit": "abc"},
        {"completed": "yes"},
        {"completed": "1"},  # the contract names true|false; Litestar would take 1 and 0
        {"completed": "True"},
        {"limit": "1e2"},  # Litestar would take it as 100
        {"limit": "1.0"},
        {"limit": "+5"},
        {"limit": "010"},  # Litestar refused it as "Expected `int`, got `str`"
        {"limit": ""},
        {"due_before": "tomorrow"},
        {"due_before": "2026-02-30"},
        {"due_before": "null"},  # Litestar would take it as no filter
        {"cursor": "not a cursor"},
        {"cursor": "!!!"},
        {"cursor": base64.urlsafe_b64encode(b'["x", "y"]').decode()},
        {"cursor": base64.urlsafe_b64encode(b"[1]").decode()},
        # well formed, but never handed out: a time without its offset
        {
            "cursor": base64.urlsafe_b64encode(
                b'["2026-01-01T00:00:00", "6f1c5a9e-0000-4000-8000-000000000000"]'
            ).decode()
        },
    ],
)
def test_list_refuses_bad_parameters_with_400(api: Any, params: dict[str, str]) -> None:
    api.create()
    problem = assert_problem(api.get("/tasks", params=params), 400)
    assert [error["field"] for error in problem["errors"]] == list(params)


@pytest.mark.parametrize(
    "query",
    [
        "/tasks?limit=abc&limit=1",  # a bad value first used to be dropped unchecked
        "/tasks?tag=t0&tag=t1",
        "/tasks?completed=true&completed=false",
        "/tasks/{id}?as_of=garbage&as_of=3000-01-01T00:00:00Z",
        "/tasks/{id}?version=1&version=2",
        "/tasks/{id}/history?limit=1&limit=2",
        "/events?after=5&after=1",
    ],
)
def test_a_parameter_given_twice_answers_400(api: Any, query: str) -> None:
    """Litestar would keep the last value: a client sending two tags would silently get
    one filter. The answer names the parameter."""
    task = api.create()
    problem = assert_problem(api.get(query.format(id=task["id"])), 400)
    name = query.split("?")[1].split("=")[0]
    assert problem["errors"] == [{"field": name, "message": "given more than once"}]


# --- GET /tasks/{id} --------------------------------------------------------------------------


def test_get_task_with_etag_and_if_none_match(api: Any) -> None:
    task = api.create()
    response = api.get(f"/tasks/{task['id']}")
    assert response.status_code == 200
    assert response.headers["etag"] == '"1"'
    assert response.json() == task

    not_modified = api.get(f"/tasks/{task['id']}", headers={"If-None-Match": '"1"'})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == '"1"'
    listed = api.get(f"/tasks/{task['id']}", headers={"If-None-Match": '"0", "1"'})
    assert listed.status_code == 304
    weak = api.get(f"/tasks/{task['id']}", headers={"If-None-Match": 'W/"1"'})
    assert weak.status_code == 304  # If-None-Match compares weakly (RFC 9110)
    assert_problem(api.get(f"/tasks/{task['id']}", headers={"If-None-Match": "1"}), 400)

    api.patch(f"/tasks/{task['id']}", json={"title": "changed"})
    changed = api.get(f"/tasks/{task['id']}", headers={"If-None-Match": '"1"'})
    assert changed.status_code == 200
    assert changed.headers["etag"] == '"2"'
    assert changed.json()["title"] == "changed"


def test_if_none_match_star_answers_304(api: Any) -> None:
    task = api.create()
    answer = api.get(f"/tasks/{task['id']}", headers={"If-None-Match": "*"})
    assert answer.status_code == 304
    assert answer.headers["etag"] == '"1"'


def test_a_last_page_that_is_exactly_full_has_no_cursor(api: Any) -> None:
    for i in range(4):
        api.create(title=f"t{i}")
    first = page(api, limit=2)
    assert first["next_cursor"] is not None
    second = page(api, limit=2, cursor=first["next_cursor"])
    assert [len(first["items"]), len(second["items"])] == [2, 2]
    assert second["next_cursor"] is None  # no empty third page to fetch


@pytest.mark.parametrize("path", ["/tasks/not-a-uuid", "/tasks/123", f"/tasks/{uuid.uuid4()}"])
def test_get_unknown_or_malformed_id_answers_404(api: Any, path: str) -> None:
    assert_problem(api.get(path), 404)
    assert_problem(api.get(f"{path}/history"), 404)


@pytest.mark.parametrize(
    "spelling",
    ["urn:uuid:{id}", "{{{id}}}", "{hex}", "{id}0"],
    ids=["urn", "braces", "no-hyphens", "too-long"],
)
def test_only_the_hyphenated_uuid_names_a_task(api: Any, spelling: str) -> None:
    """uuid.UUID reads other spellings too; a task answers at one path (either case)."""
    task = api.create()
    path = "/tasks/" + spelling.format(id=task["id"], hex=task["id"].replace("-", ""))
    assert_problem(api.get(path), 404)
    assert_problem(api.get(f"{path}/history"), 404)
    assert_problem(api.post(f"{path}/complete"), 404)
    assert api.get(f"/tasks/{task['id'].upper()}").json() == task


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("PATCH", ""),
        ("DELETE", ""),
        ("POST", "/complete"),
        ("POST", "/reopen"),
        ("POST", "/restore"),
    ],
)
def test_commands_on_a_malformed_id_answer_404(api: Any, method: str, suffix: str) -> None:
    kwargs: dict[str, Any] = {"json": {"title": "x"}} if method == "PATCH" else {}
    assert_problem(api.request(method, f"/tasks/not-a-uuid{suffix}", **kwargs), 404)


@pytest.mark.parametrize("key", [None, "bad-body-on-a-bad-path"])
@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b'{"title": ""}', "application/json"), (b"{", "application/json"), (b"x", "text/plain")],
    ids=["invalid", "malformed", "not-json"],
)
def test_a_malformed_id_answers_404_before_the_body_is_looked_at(
    api: Any, body: bytes, content_type: str, key: str | None
) -> None:
    """The path names no task, so the answer is 404 whatever the body, with an
    Idempotency-Key or without (neither is stored: no command was reached)."""
    headers = {"Content-Type": content_type, **({"Idempotency-Key": key} if key else {})}
    for _ in range(2):
        answer = api.request("PATCH", "/tasks/not-a-uuid", content=body, headers=headers)
        assert_problem(answer, 404)
        assert "idempotent-replayed" not in answer.headers


# --- history ----------------------------------------------------------------------------------


def test_history_shape_and_meta(api: Any) -> None:
    created = api.post("/tasks", json={"title": "t"}, headers={"X-Request-ID": "req-create.1"})
    assert created.status_code == 201
    assert created.headers["x-request-id"] == "req-create.1"
    task = created.json()
    renamed = api.patch(
        f"/tasks/{task['id']}", json={"title": "u"}, headers={"Idempotency-Key": "key-1"}
    )
    assert renamed.status_code == 200

    response = api.get(f"/tasks/{task['id']}/history")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"items", "next_cursor"}
    assert body["next_cursor"] is None
    first, second = body["items"]
    for event in (first, second):
        assert set(event) == EVENT_KEYS
        assert set(event["meta"]) == {"request_id", "idempotency_key"}
        assert event["task_id"] == task["id"]
        assert isinstance(event["position"], int)
        ts(event["occurred_at"])
    assert first["version"] == 1
    assert first["type"] == "TaskCreated"
    assert first["meta"] == {"request_id": "req-create.1", "idempotency_key": None}
    assert second["version"] == 2
    assert second["type"] == "TaskRenamed"
    assert second["data"] == {"title": "u"}
    assert second["meta"] == {
        "request_id": renamed.headers["x-request-id"],
        "idempotency_key": "key-1",
    }
    assert second["position"] > first["position"]
    assert ts(second["occurred_at"]) >= ts(first["occurred_at"])


def test_history_is_paged_oldest_first(api: Any) -> None:
    task = api.create(title="t0")
    # each PATCH changes four fields: four events
    for i in range(1, 26):
        api.patch(
            f"/tasks/{task['id']}",
            json={
                "title": f"t{i}",
                "description": f"d{i}",
                "priority": ["low", "high"][i % 2],
                "tags": [f"x{i}"],
            },
        )
    total = 1 + 25 * 4  # 101 events

    first = api.get(f"/tasks/{task['id']}/history")
    assert first.status_code == 200
    body = first.json()
    assert [e["version"] for e in body["items"]] == list(range(1, 101))  # default limit 100
    assert isinstance(body["next_cursor"], str)
    rest = api.get(f"/tasks/{task['id']}/history", params={"cursor": body["next_cursor"]}).json()
    assert [e["version"] for e in rest["items"]] == [101]
    assert rest["next_cursor"] is None

    everything = api.get(f"/tasks/{task['id']}/history", params={"limit": 200}).json()
    assert [e["version"] for e in everything["items"]] == list(range(1, total + 1))
    positions = [e["position"] for e in everything["items"]]
    assert positions == sorted(positions)
    assert everything["next_cursor"] is None

    versions: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 7}
        if cursor:
            params["cursor"] = cursor
        got = api.get(f"/tasks/{task['id']}/history", params=params).json()
        assert len(got["items"]) <= 7
        versions += [e["version"] for e in got["items"]]
        cursor = got["next_cursor"]
        if cursor is None:
            break
    assert versions == list(range(1, total + 1))

    one = api.get(f"/tasks/{task['id']}/history", params={"limit": 1}).json()
    assert [e["type"] for e in one["items"]] == ["TaskCreated"]
    assert one["next_cursor"] is not None


def test_history_works_after_deletion(api: Any) -> None:
    task = api.create()
    api.delete(f"/tasks/{task['id']}")
    response = api.get(f"/tasks/{task['id']}/history")
    assert response.status_code == 200
    assert [e["type"] for e in response.json()["items"]] == ["TaskCreated", "TaskDeleted"]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "201"},
        {"limit": "abc"},
        {"cursor": "garbage!"},
        {"cursor": base64.urlsafe_b64encode(b'"x"').decode()},
        {"cursor": base64.urlsafe_b64encode(b"[-5]").decode()},  # never handed out
        {"cursor": base64.urlsafe_b64encode(b"[0]").decode()},
    ],
)
def test_history_refuses_bad_parameters_with_400(api: Any, params: dict[str, str]) -> None:
    task = api.create()
    problem = assert_problem(api.get(f"/tasks/{task['id']}/history", params=params), 400)
    assert [error["field"] for error in problem["errors"]] == list(params)


def test_queries_send_the_json_that_the_command_answered_byte_for_byte(
    api: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries send the row's stored JSON (`body`). Whoever wrote the row (a command, the
    rebuild, migration 0003's fill), a query answers with the command's bytes."""
    created = api.create(
        title='Tab\there, "quoted", é ✓ ÄSS',
        description="line\nbreak \\ back\\slash \u2028 \x01",
        tags=["a\tb", "ü"],
        due_date="2026-12-24",
        priority="high",
    )
    task_id = created["id"]
    answered = api.patch(f"/tasks/{task_id}", json={"completed": True})
    assert answered.status_code == 200, answered.text

    def reads_back_as_answered() -> None:
        got = api.get(f"/tasks/{task_id}")
        assert got.status_code == 200
        assert got.headers["etag"] == '"2"'
        assert got.content == answered.content
        listed = api.get("/tasks")
        assert listed.status_code == 200
        assert listed.content == b'{"items":[' + answered.content + b'],"next_cursor":null}'

    reads_back_as_answered()
    # The rebuild, --check and the migration in sessions whose TimeZone is not UTC (PGTZ
    # outranks `options`; only around them, so that the app's pool never opens such a
    # connection): the JSON still shows the times as the command did, with Z.
    with monkeypatch.context() as tokyo:
        tokyo.setenv("PGTZ", "Asia/Tokyo")
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
        asyncio.run(projection.rebuild_all(database_url))
        assert asyncio.run(projection.check(database_url)) == []
    reads_back_as_answered()
    with monkeypatch.context() as tokyo:
        tokyo.setenv("PGTZ", "Asia/Tokyo")
        # Migrations 0003 and 0004 taken back and applied again, through yoyo, over
        # existing rows (projection_rows checks 0004's case-folded titles).
        backend = get_backend(db.yoyo_url(database_url))
        migrations = read_migrations(str(db.migrations_dir()))
        filled = ["0003.task-body", "0004.task-title-casefolded"]
        with backend.lock():
            backend.rollback_migrations(
                backend.to_rollback(migrations.filter(lambda m: m.id in filled))
            )
        backend.connection.close()
        assert db.migrate(database_url) == filled
    reads_back_as_answered()
    assert asyncio.run(projection.check(database_url)) == []  # the fills included
