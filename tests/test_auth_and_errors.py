"""Contract tests through the real app: auth, isolation between users, validation and error
bodies, request ids and the operations endpoints (API.md, "Auth", "The task", "Errors",
"Operations")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import re
import time
import uuid
import warnings
from typing import Any

import jwt
import psycopg
import pytest
from conftest import JWT_SECRET, assert_problem
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from todo_cqrs import auth, db
from todo_cqrs.config import Settings
from todo_cqrs.http import ServiceEdge, _Deadlines, create_app

REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._-]{1,128}")


def token(claims: dict[str, Any], key: str | None = JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def fresh_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": f"user-{uuid.uuid4()}", "iat": now, "exp": now + 600, **extra}


def error_fields(response: Any) -> set[str]:
    body = assert_problem(response, 400)
    assert isinstance(body.get("errors"), list), body
    for error in body["errors"]:
        assert set(error) == {"field", "message"}
        assert isinstance(error["message"], str) and error["message"]
    return {error["field"] for error in body["errors"]}


# --- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": f"Token {token(fresh_claims())}"},
        {"Authorization": f"Basic {token(fresh_claims())}"},
    ],
    ids=["none", "empty", "scheme-only", "scheme-and-spaces", "basic", "token-scheme", "basic-jwt"],
)
def test_no_token_answers_401_with_a_bare_bearer_challenge(
    client: Any, headers: dict[str, str]
) -> None:
    response = client.get("/tasks", headers=headers)
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/tasks"),
        ("GET", f"/tasks/{uuid.uuid4()}"),
        ("PATCH", f"/tasks/{uuid.uuid4()}"),
        ("DELETE", f"/tasks/{uuid.uuid4()}"),
        ("POST", f"/tasks/{uuid.uuid4()}/complete"),
        ("POST", f"/tasks/{uuid.uuid4()}/reopen"),
        ("POST", f"/tasks/{uuid.uuid4()}/restore"),
        ("GET", f"/tasks/{uuid.uuid4()}/history"),
    ],
)
def test_every_task_endpoint_needs_a_token(client: Any, method: str, path: str) -> None:
    kwargs: dict[str, Any] = {"json": {"title": "x"}} if method in {"POST", "PATCH"} else {}
    response = client.request(method, path, **kwargs)
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def _invalid_tokens() -> dict[str, str]:
    now = int(time.time())
    user = f"user-{uuid.uuid4()}"
    with warnings.catch_warnings():  # the test secret is short for SHA-512; beside the point
        warnings.simplefilter("ignore")
        hs512 = token(fresh_claims(), algorithm="HS512")
    return {
        "bad-signature": token(fresh_claims(), key="another-secret-" + "y" * 40),
        "expired-beyond-leeway": token({"sub": user, "iat": now - 600, "exp": now - 60}),
        "missing-exp": token({"sub": user, "iat": now}),
        "missing-sub": token({"iat": now, "exp": now + 600}),
        "empty-sub": token({"sub": "", "exp": now + 600}),
        "sub-256-chars": token({"sub": "u" * 256, "exp": now + 600}),
        "sub-not-a-string": token({"sub": 12345, "exp": now + 600}),
        # the user id is PostgreSQL text: these reached the database and answered 500
        "sub-with-nul": token({"sub": "a\x00b", "exp": now + 600}),
        "sub-with-lone-surrogate": token({"sub": "a\ud800b", "exp": now + 600}),
        "exp-too-large-for-a-float": token({"sub": user, "exp": 10**400}),
        "exp-a-string": token({"sub": user, "exp": str(now + 600)}),
        "alg-none": token(fresh_claims(), key=None, algorithm="none"),
        "nbf-in-the-future": token(fresh_claims(nbf=now + 300)),
        "hs512": hs512,
        "garbage": "not.a.jwt",
        "two-parts": "abc.def",
    }


@pytest.mark.parametrize("name", list(_invalid_tokens()))
def test_invalid_token_answers_401_invalid_token(client: Any, name: str) -> None:
    bad = _invalid_tokens()[name]
    response = client.get("/tasks", headers={"Authorization": f"Bearer {bad}"})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_invalid_token_on_a_command_answers_401_and_creates_nothing(client: Any) -> None:
    user = f"user-{uuid.uuid4()}"
    forged = token({"sub": user, "exp": int(time.time()) + 600}, key="wrong-" + "z" * 40)
    response = client.post(
        "/tasks", json={"title": "x"}, headers={"Authorization": f"Bearer {forged}"}
    )
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    real = token({"sub": user, "exp": int(time.time()) + 600})
    listed = client.get("/tasks", headers={"Authorization": f"Bearer {real}"})
    assert listed.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"exp": -10}, id="expired-within-leeway"),
        pytest.param({"nbf": 10}, id="nbf-within-leeway"),
        pytest.param({"sub": "u" * 255}, id="sub-255-chars"),
        pytest.param({"sub": "x"}, id="sub-1-char"),
    ],
)
def test_valid_tokens_are_accepted(client: Any, claims: dict[str, Any]) -> None:
    now = int(time.time())
    full = fresh_claims()
    for name, value in claims.items():
        full[name] = now + value if name in {"exp", "nbf"} else value
    headers = {"Authorization": f"Bearer {token(full)}"}
    response = client.get("/tasks", headers=headers)
    assert response.status_code == 200, response.text
    created = client.post("/tasks", json={"title": "mine"}, headers=headers)
    assert created.status_code == 201, created.text
    assert client.get(f"/tasks/{created.json()['id']}", headers=headers).status_code == 200


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_scheme_word_is_case_insensitive(client: Any, scheme: str) -> None:
    response = client.get("/tasks", headers={"Authorization": f"{scheme} {token(fresh_claims())}"})
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "next_cursor": None}


def test_the_user_is_the_sub_claim(client: Any) -> None:
    sub = f"user-{uuid.uuid4()}"
    first = {"Authorization": f"Bearer {token(fresh_claims(sub=sub))}"}
    second = {"Authorization": f"Bearer {token(fresh_claims(sub=sub))}"}
    created = client.post("/tasks", json={"title": "shared"}, headers=first)
    assert created.status_code == 201
    listed = client.get("/tasks", headers=second).json()
    assert [t["id"] for t in listed["items"]] == [created.json()["id"]]


# --- isolation --------------------------------------------------------------------------------


def test_another_users_task_answers_404_everywhere(api: Any, other_api: Any) -> None:
    task = api.create(title="secret", tags=["private"])
    path = f"/tasks/{task['id']}"
    unknown = assert_problem(other_api.get(f"/tasks/{uuid.uuid4()}"), 404)

    answers = [
        other_api.get(path),
        other_api.patch(path, json={"title": "stolen"}),
        other_api.patch(path, json={"title": "stolen"}, headers={"If-Match": '"7"'}),
        other_api.post(f"{path}/complete"),
        other_api.post(f"{path}/reopen"),
        other_api.post(f"{path}/restore"),
        other_api.get(f"{path}/history"),
        other_api.delete(path),
        other_api.delete(path, headers={"If-Match": '"1"'}),
    ]
    for response in answers:
        body = assert_problem(response, 404)
        assert body == unknown  # exactly as an id that does not exist
        assert "etag" not in response.headers

    for params in ({}, {"q": "secret"}, {"tag": "private"}):
        listed = other_api.get("/tasks", params=params)
        assert listed.status_code == 200
        assert listed.json() == {"items": [], "next_cursor": None}

    # and the owner's task is untouched
    mine = api.get(path)
    assert mine.status_code == 200
    assert mine.json() == task
    history = api.get(f"{path}/history").json()["items"]
    assert [e["type"] for e in history] == ["TaskCreated"]


def test_another_users_deleted_task_cannot_be_restored(api: Any, other_api: Any) -> None:
    task = api.create()
    api.delete(f"/tasks/{task['id']}")
    assert_problem(other_api.post(f"/tasks/{task['id']}/restore"), 404)
    assert_problem(other_api.post(f"/tasks/{task['id']}/restore", headers={"If-Match": '"1"'}), 404)
    assert_problem(other_api.get(f"/tasks/{task['id']}/history"), 404)
    history = api.get(f"/tasks/{task['id']}/history").json()["items"]
    assert [e["type"] for e in history] == ["TaskCreated", "TaskDeleted"]


# --- validation -------------------------------------------------------------------------------

TWENTY_ONE_TAGS = [f"t{i}" for i in range(21)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": ""}, "title"),
        ({"title": " \t\n "}, "title"),
        ({"title": "x" * 501}, "title"),
        ({"title": "a\x00b"}, "title"),
        ({"title": None}, "title"),
        ({"title": 5}, "title"),
        ({}, "title"),
        ({"title": "t", "description": "d" * 10_001}, "description"),
        ({"title": "t", "description": "a\x00"}, "description"),
        ({"title": "t", "description": None}, "description"),
        ({"title": "t", "priority": "urgent"}, "priority"),
        ({"title": "t", "priority": "HIGH"}, "priority"),
        ({"title": "t", "priority": None}, "priority"),
        ({"title": "t", "due_date": "2026-13-01"}, "due_date"),
        ({"title": "t", "due_date": "2026-02-30"}, "due_date"),
        ({"title": "t", "due_date": "tomorrow"}, "due_date"),
        ({"title": "t", "due_date": 20260101}, "due_date"),
        ({"title": "t", "tags": TWENTY_ONE_TAGS}, "tags"),
        ({"title": "t", "tags": ["a", "b", "a"]}, "tags"),
        ({"title": "t", "tags": [""]}, "tags"),
        ({"title": "t", "tags": ["x" * 51]}, "tags"),
        ({"title": "t", "tags": ["ok\x00"]}, "tags"),
        ({"title": "t", "tags": [1]}, "tags"),
        ({"title": "t", "tags": "home"}, "tags"),
        ({"title": "t", "tags": None}, "tags"),
        ({"title": "t", "colour": "red"}, "colour"),
        ({"title": "t", "completed": True}, "completed"),
        ({"title": "t", "id": str(uuid.uuid4())}, "id"),
    ],
)
def test_create_field_rules_answer_400_naming_the_field(
    api: Any, body: dict[str, Any], field: str
) -> None:
    assert error_fields(api.post("/tasks", json=body)) == {field}
    assert api.get("/tasks").json()["items"] == []


def test_create_accepts_values_at_the_limits(api: Any) -> None:
    tags = [f"{i:02d}" + "x" * 48 for i in range(20)]
    task = api.create(
        title="  " + "t" * 500 + "  ",
        description="d" * 10_000,
        tags=tags,
        due_date=None,
    )
    assert task["title"] == "t" * 500
    assert len(task["description"]) == 10_000
    assert task["tags"] == tags
    assert api.create(tags=["a", "A"])["tags"] == ["a", "A"]  # tags compare case-sensitively


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "  "}, "title"),
        ({"title": None}, "title"),
        ({"description": "x" * 10_001}, "description"),
        ({"priority": "none"}, "priority"),
        ({"due_date": "2026-1-1"}, "due_date"),
        ({"tags": ["a", "a"]}, "tags"),
        ({"tags": None}, "tags"),
        ({"completed": None}, "completed"),
        ({"completed": "yes"}, "completed"),
        ({"version": 3}, "version"),
    ],
)
def test_patch_field_rules_answer_400_naming_the_field(
    api: Any, body: dict[str, Any], field: str
) -> None:
    task = api.create()
    assert error_fields(api.patch(f"/tasks/{task['id']}", json=body)) == {field}
    assert api.get(f"/tasks/{task['id']}").json() == task


def test_several_invalid_fields_are_each_listed(api: Any) -> None:
    response = api.post(
        "/tasks", json={"title": " ", "description": "d" * 10_001, "tags": ["a", "a"]}
    )
    assert error_fields(response) == {"title", "description", "tags"}
    task = api.create()
    response = api.patch(f"/tasks/{task['id']}", json={"title": "", "tags": [""]})
    assert error_fields(response) == {"title", "tags"}


def test_several_invalid_fields_of_wrong_type_are_each_listed(api: Any) -> None:
    response = api.post(
        "/tasks", json={"title": "", "priority": "urgent", "due_date": "not-a-date"}
    )
    assert error_fields(response) == {"title", "priority", "due_date"}


def _sized_body(size: int) -> bytes:
    head, tail = b'{"title": "big"', b"}"
    body = head + b" " * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body


def test_body_of_64_kib_is_accepted_and_one_byte_more_answers_413(api: Any) -> None:
    json_header = {"Content-Type": "application/json"}
    accepted = api.post("/tasks", content=_sized_body(64 * 1024), headers=json_header)
    assert accepted.status_code == 201, accepted.text
    assert_problem(api.post("/tasks", content=_sized_body(64 * 1024 + 1), headers=json_header), 413)
    task = accepted.json()
    assert_problem(
        api.patch(f"/tasks/{task['id']}", content=_sized_body(100_000), headers=json_header), 413
    )
    assert [t["id"] for t in api.get("/tasks").json()["items"]] == [task["id"]]


@pytest.mark.parametrize(
    ("method", "suffix", "status"),
    [("POST", "/complete", 200), ("POST", "/reopen", 200), ("DELETE", "", 204),
     ("POST", "/restore", 409)],  # restore of a task that is not deleted
)  # fmt: skip
def test_commands_without_a_body_answer_413_to_one_over_64_kib(
    api: Any, method: str, suffix: str, status: int
) -> None:
    """They read no body of theirs, but the limit holds for every command, with an
    Idempotency-Key or without; nothing is appended."""
    task = api.create()
    path = f"/tasks/{task['id']}{suffix}"
    assert_problem(api.request(method, path, content=b"x" * (64 * 1024 + 1)), 413)
    assert api.get(f"/tasks/{task['id']}").json()["version"] == 1
    assert api.request(method, path, content=b"x" * (64 * 1024)).status_code == status


@pytest.mark.parametrize(
    "content",
    [b'{"title": ', b"not json", b'{"title": "x",}', b"", b"[]", b'"title"', b"null"],
    ids=["truncated", "text", "trailing-comma", "empty", "array", "string", "null"],
)
def test_malformed_json_answers_400(api: Any, content: bytes) -> None:
    response = api.post("/tasks", content=content, headers={"Content-Type": "application/json"})
    assert_problem(response, 400)
    task = api.create()
    response = api.patch(
        f"/tasks/{task['id']}", content=content, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {},
    ],
    ids=["text-plain", "form", "missing"],
)
def test_body_that_is_not_json_answers_415(api: Any, headers: dict[str, str]) -> None:
    response = api.post("/tasks", content=b'{"title": "x"}', headers=headers)
    assert_problem(response, 415)
    task = api.create()
    response = api.patch(f"/tasks/{task['id']}", content=b'{"title": "y"}', headers=headers)
    assert_problem(response, 415)
    assert api.get(f"/tasks/{task['id']}").json()["title"] == task["title"]


def test_json_content_type_with_charset_is_accepted(api: Any) -> None:
    response = api.post(
        "/tasks",
        content=b'{"title": "x"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 201, response.text


def test_invalid_utf8_answers_400(api: Any) -> None:
    response = api.post(
        "/tasks", content=b'{"title": "caf\xe9"}', headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)
    assert api.get("/tasks").json()["items"] == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no-such-route", 404),
        ("PUT", "/tasks", 405),
        ("GET", f"/tasks/{uuid.uuid4()}", 404),
    ],
)
def test_other_errors_are_problem_bodies(api: Any, method: str, path: str, status: int) -> None:
    assert_problem(api.request(method, path), status)


# --- X-Request-ID -----------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["abc", "A.b-c_9", "r" * 128, "1"])
def test_valid_request_id_is_echoed(api: Any, client: Any, given: str) -> None:
    assert api.get("/tasks", headers={"X-Request-ID": given}).headers["x-request-id"] == given
    assert client.get("/tasks", headers={"X-Request-ID": given}).headers["x-request-id"] == given
    assert client.get("/health", headers={"X-Request-ID": given}).headers["x-request-id"] == given


def test_request_id_is_taken_without_surrounding_whitespace(api: Any) -> None:
    response = api.get("/tasks", headers={"X-Request-ID": b"abc \t"})
    assert response.headers["x-request-id"] == "abc"


@pytest.mark.parametrize("given", ["", "has space", "r" * 129, "a/b", "semi;colon", "caf\u00e9"])
def test_invalid_request_id_is_replaced(api: Any, given: str) -> None:
    response = api.get("/tasks", headers={"X-Request-ID": given.encode()})
    assert response.status_code == 200
    answered = response.headers["x-request-id"]
    assert answered != given
    assert REQUEST_ID_FORM.fullmatch(answered)


def test_every_response_carries_a_request_id(api: Any, client: Any) -> None:
    seen = set()
    for response in (
        api.get("/tasks"),
        api.post("/tasks", json={"title": "x"}),
        api.post("/tasks", json={"title": ""}),
        client.get("/tasks"),
        client.get("/health"),
        client.get("/no-such-route"),
    ):
        answered = response.headers["x-request-id"]
        assert REQUEST_ID_FORM.fullmatch(answered)
        seen.add(answered)
    assert len(seen) == 6  # a new one per request


# --- operations -------------------------------------------------------------------------------


def test_health_and_ready_need_no_token(client: Any) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200


def test_an_unmigrated_database_answers_503_not_500(
    settings: Settings, server_url: str, api: Any
) -> None:
    """An app started on a database that nobody migrated (`serve` migrates first; a bare
    uvicorn or a rolled-back database do not): /ready, queries and commands answer 503."""
    url = db.create_database(server_url, "todo_cqrs_unmigrated")
    try:
        app = create_app(dataclasses.replace(settings, database_url=url, listen_database_url=url))
        with TestClient(app=app) as bare:  # type: ignore[arg-type]
            ready = bare.get("/ready")
            assert assert_problem(ready, 503)["detail"].startswith("Migrations not applied: 0001")
            for method, path in [("GET", "/tasks"), ("GET", f"/tasks/{uuid.uuid4()}")]:
                answer = bare.request(method, path, headers=api.auth)
                problem = assert_problem(answer, 503)
                assert (
                    problem["detail"] == "The database lacks migrations; run `todo-cqrs migrate`."
                )
                assert answer.headers["retry-after"] == "5"
            created = bare.post("/tasks", json={"title": "a"}, headers=api.auth)
            assert_problem(created, 503)
    finally:
        db.drop_database(server_url, url)


def test_a_database_missing_a_later_migration_answers_503_not_500(
    settings: Settings, server_url: str, api: Any
) -> None:
    """Migration 0006 rolled back under a running server (its README's warning): commands
    call the function it drops, and meet a missing function rather than a missing table."""
    url = db.create_database(server_url, "todo_cqrs_rolled_back")
    try:
        db.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP FUNCTION notify_event_listeners(text, text)")
        app = create_app(dataclasses.replace(settings, database_url=url, listen_database_url=url))
        with TestClient(app=app) as bare:  # type: ignore[arg-type]
            created = bare.post("/tasks", json={"title": "a"}, headers=api.auth)
            problem = assert_problem(created, 503)
            assert problem["detail"] == "The database lacks migrations; run `todo-cqrs migrate`."
            assert created.headers["retry-after"] == "5"
            assert bare.get("/tasks", headers=api.auth).json()["items"] == []  # nothing kept
    finally:
        db.drop_database(server_url, url)


def test_metrics_count_requests_and_durations_by_route_and_status(api: Any, client: Any) -> None:
    missing = uuid.uuid4()
    assert api.get(f"/tasks/{missing}").status_code == 404
    assert client.get("/health").status_code == 200

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert str(missing) not in text  # routes are templates, not raw paths

    families = {family.name: family for family in text_string_to_metric_families(text)}
    counter = families["todo_http_requests"]
    assert counter.type == "counter"
    totals = [s for s in counter.samples if s.name == "todo_http_requests_total"]
    health = [s for s in totals if s.labels.get("route") == "/health"]
    assert any(s.labels.get("status") == "200" and s.value >= 1 for s in health)
    task_404 = [
        s
        for s in totals
        if "{task_id" in s.labels.get("route", "") and s.labels.get("status") == "404"
    ]
    assert task_404 and all(s.labels["route"].startswith("/tasks/{task_id") for s in task_404)

    histograms = [f for f in families.values() if f.type == "histogram"]
    duration = [f for f in histograms if "duration" in f.name and f.name.startswith("todo_http")]
    assert duration, [f.name for f in histograms]
    buckets = [s for s in duration[0].samples if s.name.endswith("_bucket")]
    assert any(
        s.labels.get("route") == "/health" and s.labels.get("status") == "200" for s in buckets
    )
    assert any(s.labels.get("le") == "+Inf" for s in buckets)


def test_openapi_document_lists_the_task_paths(client: Any) -> None:
    response = client.get("/schema/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    paths = set(document["paths"])
    assert {
        "/tasks",
        "/tasks/{task_id}",
        "/tasks/{task_id}/complete",
        "/tasks/{task_id}/reopen",
        "/tasks/{task_id}/restore",
        "/tasks/{task_id}/history",
    } <= paths
    assert {"get", "post"} <= set(document["paths"]["/tasks"])
    assert {"get", "patch", "delete"} <= set(document["paths"]["/tasks/{task_id}"])
    get_task = document["paths"]["/tasks/{task_id}"]["get"]["responses"]["200"]
    assert set(get_task["headers"]) == {"ETag"}
    stream = document["paths"]["/events/stream"]["get"]["responses"]["200"]
    assert set(stream["content"]) == {"text/event-stream"}


def test_openapi_document_shows_the_task_and_the_headers_as_the_contract_does(
    client: Any,
) -> None:
    """The task has exactly the contract's fields (no `deleted`); the commands take If-Match
    and Idempotency-Key and answer with ETag (and Location on create), GET takes
    If-None-Match."""
    document = client.get("/schema/openapi.json").json()
    task = document["components"]["schemas"]["Task"]
    assert list(task["properties"]) == [
        "id", "title", "description", "completed", "priority", "due_date", "tags",
        "version", "created_at", "updated_at", "completed_at",
    ]  # fmt: skip
    paths = document["paths"]

    def headers_in(operation: dict[str, Any]) -> set[str]:
        return {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}

    commands = {
        ("/tasks", "post"): "201",
        ("/tasks/{task_id}", "patch"): "200",
        ("/tasks/{task_id}/complete", "post"): "200",
        ("/tasks/{task_id}/reopen", "post"): "200",
        ("/tasks/{task_id}/restore", "post"): "200",
        ("/tasks/{task_id}", "delete"): "204",
    }
    for (path, method), status in commands.items():
        operation = paths[path][method]
        wanted = {"Idempotency-Key"} if path == "/tasks" else {"Idempotency-Key", "If-Match"}
        assert headers_in(operation) == wanted, (path, method)
        assert "413" in operation["responses"], (path, method)
        answered = set(operation["responses"][status].get("headers", {}))
        if status == "200":
            assert answered == {"ETag", "Idempotent-Replayed"}, (path, method)
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Task"}, (path, method)
    assert set(paths["/tasks"]["post"]["responses"]["201"]["headers"]) == {
        "Location", "ETag", "Idempotent-Replayed",
    }  # fmt: skip
    assert headers_in(paths["/tasks/{task_id}"]["get"]) == {"If-None-Match", "X-Consistency-Token"}


def test_a_verified_token_is_not_reused_past_its_exp_and_leeway() -> None:
    """Verified tokens are kept up to a minute, but never past exp + leeway."""
    verifier = auth.Verifier(secret=JWT_SECRET)
    now = int(time.time())
    # Expired 27 s ago: inside the 30 s leeway for about 3 s more.
    token = jwt.encode({"sub": "u", "iat": now - 60, "exp": now - 27}, JWT_SECRET, "HS256")
    assert asyncio.run(verifier.verify(token)) == "u"
    time.sleep(4.5)
    with pytest.raises(auth.InvalidToken):
        asyncio.run(verifier.verify(token))


def test_the_default_heartbeat_keeps_the_contracts_15_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TODO_SSE_HEARTBEAT", raising=False)
    assert Settings.from_env().heartbeat == 10.0  # the README's default


async def _swallow_one_cancel(deadlines: _Deadlines) -> tuple[int, float]:
    """A request that catches the deadline's first cancel and runs on (psycopg does, while
    it asks the server to cancel the statement); how many cancels it took, and how long."""
    task = deadlines.watch()
    started = asyncio.get_running_loop().time()
    try:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            task.uncancel()
            await asyncio.sleep(5)
    except asyncio.CancelledError:
        pass
    return deadlines.stop(task), asyncio.get_running_loop().time() - started


def test_a_request_that_runs_on_past_its_deadlines_cancel_is_cancelled_again() -> None:
    deadlines = _Deadlines(0.2)
    cancels, took = asyncio.run(_swallow_one_cancel(deadlines))
    assert cancels == 2
    assert 0.2 + deadlines.recancel_after <= took < 0.2 + deadlines.recancel_after + 1.1
    assert deadlines.due == {} and deadlines.cancels == {}


def test_the_deadline_check_starts_again_on_a_new_event_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loop closed while a request waited (its tasks never cancelled) leaves its check
    behind; requests on the next loop get a check of their own."""
    deadlines = _Deadlines(0.2)

    async def watch_and_leave() -> None:
        deadlines.watch()

    first = asyncio.new_event_loop()
    first.run_until_complete(first.create_task(watch_and_leave()))
    first.close()
    assert len(deadlines.due) == 1

    async def wait_too_long() -> float:
        task = deadlines.watch()
        started = asyncio.get_running_loop().time()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        assert deadlines.stop(task) == 1
        return asyncio.get_running_loop().time() - started

    assert 0.2 <= asyncio.run(wait_too_long()) < 1.2
    assert deadlines.due == {}
    # The first loop's check is destroyed pending, as this test means it to be: collected
    # here, its "Task was destroyed but it is pending!" stays out of the run's output.
    del first
    with caplog.at_level(logging.CRITICAL, logger="asyncio"):
        gc.collect()


def test_a_swallowed_deadline_cancel_is_forgotten_once_the_answer_begins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """psycopg_pool hands over a connection that arrived with a cancel and swallows the
    cancel: the request runs on and begins its answer (a stream). uvicorn's cut at shutdown
    must then end that answer, not be taken for the deadline's cancel."""
    begun = asyncio.Event()

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        begun.set()
        await asyncio.sleep(5)

    edge = ServiceEdge(stream, 0.2)  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []

    async def serve_and_cut() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/events/stream", "headers": []}
        request = asyncio.create_task(edge({**scope, "query_string": b""}, receive, send))
        await asyncio.wait_for(begun.wait(), 2)
        request.cancel()  # uvicorn, past TODO_SHUTDOWN_TIMEOUT
        await request

    with caplog.at_level(logging.INFO, logger="todo_cqrs"):
        asyncio.run(serve_and_cut())
    messages = [r.getMessage() for r in caplog.records]
    assert "request cut at shutdown" in messages
    assert not [m for m in messages if m.startswith("request passed")]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
