"""Hostile input: the classic bad requests each answer a 4xx (never a 5xx) and leave nothing
behind, and SQL fragments are stored verbatim and never executed."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from conftest import JWT_SECRET, Api, assert_problem
from helpers import ServeProcess, service_env

from todo_cqrs import db
from todo_cqrs.auth import mint_token
from todo_cqrs.config import Settings
from todo_cqrs.http import BoundedHeadProtocol, create_app

HUGE_INT = str(10**400)
STRING_FIELDS = ("title", "description", "priority", "due_date")
SQL = ("'; DROP TABLE events; --", "%' OR 1=1 --", "\\x27", "' OR '1'='1", "\x27")


def event_count(database_url: str, user: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE user_id = %s", (user,)).fetchone()
    assert row is not None
    return int(row[0])


def post_raw(api: Api, url: str, body: bytes, method: str = "POST", **headers: str) -> Any:
    return api.request(
        method, url, content=body, headers={"Content-Type": "application/json", **headers}
    )


# --- NUL bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field", [*STRING_FIELDS, "tags"])
def test_nul_in_every_string_field_is_refused(api: Api, database_url: str, field: str) -> None:
    task = api.create(title="before")
    before = event_count(database_url, api.user)
    value: Any = ["ok", "a\x00b"] if field == "tags" else "a\x00b"
    create = api.post("/tasks", json={"title": "t", field: value})
    edit = api.patch(f"/tasks/{task['id']}", json={field: value})
    for response in (create, edit):
        assert response.status_code == 400, response.text
        assert any(e["field"] == field for e in response.json()["errors"]), response.text
    assert event_count(database_url, api.user) == before
    assert api.get(f"/tasks/{task['id']}").json() == task


@pytest.mark.parametrize("name", ["q", "tag", "cursor"])
def test_nul_in_a_query_parameter_is_refused(api: Api, database_url: str, name: str) -> None:
    task = api.create()
    before = event_count(database_url, api.user)
    assert_problem(api.get("/tasks", params={name: "a\x00b"}), 400)
    assert_problem(api.get(f"/tasks/{task['id']}/history", params={"cursor": "\x00"}), 400)
    assert_problem(api.get(f"/tasks/{task['id']}", params={"as_of": "\x00"}), 400)
    assert api.get("/tasks/%00").status_code == 404
    assert event_count(database_url, api.user) == before


# --- bytes that are not UTF-8, numbers too big, bodies nested too deep ---------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"title": "\xff\xfe"}',
        b'{"title": "ok", "tags": ["\xc3\x28"]}',
        b'{"title": "\xed\xa0\x80"}',  # an encoded lone surrogate
        b'{"title": "\\ud800"}',  # an escaped lone surrogate
        b"\x80\x81\x82",
    ],
    ids=["ff-fe", "bad-continuation", "encoded-surrogate", "escaped-surrogate", "bare-bytes"],
)
def test_invalid_utf8_body_is_refused(api: Api, database_url: str, body: bytes) -> None:
    task = api.create()
    before = event_count(database_url, api.user)
    assert_problem(post_raw(api, "/tasks", body), 400)
    assert_problem(post_raw(api, f"/tasks/{task['id']}", body, method="PATCH"), 400)
    assert_problem(post_raw(api, "/tasks", body, **{"Idempotency-Key": uuid.uuid4().hex}), 400)
    assert event_count(database_url, api.user) == before


@pytest.mark.parametrize("number", ["1e999", "-1e999", HUGE_INT, "-" + HUGE_INT])
@pytest.mark.parametrize("field", [*STRING_FIELDS, "tags", "completed"])
def test_huge_numbers_in_a_body_are_refused(
    api: Api, database_url: str, number: str, field: str
) -> None:
    task = api.create()
    before = event_count(database_url, api.user)
    value = number.encode()
    if field != "title":
        create = post_raw(api, "/tasks", b'{"title": "t", "%s": %s}' % (field.encode(), value))
    else:
        create = post_raw(api, "/tasks", b'{"title": %s}' % value)
    assert_problem(create, 400)  # for `completed` too: it is no field of a new task
    edit = post_raw(
        api, f"/tasks/{task['id']}", b'{"%s": %s}' % (field.encode(), value), method="PATCH"
    )
    assert_problem(edit, 400)
    assert event_count(database_url, api.user) == before


@pytest.mark.parametrize("number", ["1e999", HUGE_INT, "-" + HUGE_INT, str(2**63), str(2**64)])
def test_huge_numbers_in_query_parameters(api: Api, database_url: str, number: str) -> None:
    task = api.create()
    before = event_count(database_url, api.user)
    for url in ("/tasks", f"/tasks/{task['id']}/history", "/events"):
        assert_problem(api.get(url, params={"limit": number}), 400)
    # A version past what an integer holds is past the task's current one: 404 (or 400 when
    # it is not an integer at all, or below 1).
    answer = api.get(f"/tasks/{task['id']}", params={"version": number})
    assert answer.status_code == (404 if number.isdigit() else 400), answer.text
    # Past the largest position a bigint holds (and so past what the answer's next_position
    # could say back to a reader of 64-bit integers): 400, like any bad parameter. The
    # largest one itself is a position past every event: an empty page.
    assert_problem(api.get("/events", params={"after": number}), 400)
    feed = api.get("/events", params={"after": str(2**63 - 1)})
    assert feed.json() == {"items": [], "next_position": 2**63 - 1}
    assert event_count(database_url, api.user) == before


def test_deeply_nested_json_is_refused(api: Api, database_url: str) -> None:
    task = api.create()
    before = event_count(database_url, api.user)
    huge = b"[" * 100_000 + b"]" * 100_000  # 200 KB: over the 64 KiB limit
    deep = b"[" * 30_000 + b"]" * 30_000  # 60 KB: under it, and far past msgspec's depth
    deep_object = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    in_a_field = b'{"title": "t", "tags": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    for body in (huge, deep, deep_object, in_a_field):
        for keyed in (False, True):
            headers = {"Idempotency-Key": uuid.uuid4().hex} if keyed else {}
            create = post_raw(api, "/tasks", body, **headers)
            headers = {"Idempotency-Key": uuid.uuid4().hex} if keyed else {}
            edit = post_raw(api, f"/tasks/{task['id']}", body, method="PATCH", **headers)
            for response in (create, edit):
                assert_problem(response, 413 if body is huge else 400)
    assert event_count(database_url, api.user) == before


# --- many query parameters, a huge header ----------------------------------------------------


@pytest.mark.parametrize("param", ["a=1", "tag=t", "q=x", "x="])
def test_ten_thousand_query_parameters(api: Api, database_url: str, param: str) -> None:
    """GET /tasks with one parameter 10,000 times: refused at once as repeated (known and
    unknown names alike), never a 5xx, in linear time. (httpx refuses a query over 64 KiB,
    so the parameters are short ones.)"""
    api.create()
    before = event_count(database_url, api.user)
    answer = api.get("/tasks?" + "&".join([param] * 10_000))
    problem = assert_problem(answer, 400)
    assert problem["errors"] == [{"field": param.split("=")[0], "message": "given more than once"}]
    assert event_count(database_url, api.user) == before
    # Thousands of different repeated names: the answer lists ten, not all of them.
    many = "&".join(f"p{i}=1&p{i}=2" for i in range(3_000))
    assert len(assert_problem(api.get("/tasks?" + many), 400)["errors"]) == 10


def test_a_one_megabyte_header_through_a_real_server(database_url: str, tmp_path: Path) -> None:
    """The test client does not model header limits, and uvicorn's httptools parser has
    none: the service itself answers `431` to headers over 64 KiB (a closed connection would
    be allowed too); never a 5xx, nothing appended, and the server keeps serving."""
    env = service_env(
        DATABASE_URL=database_url,
        TODO_JWT_SECRET=JWT_SECRET,
        TODO_DATA_DIR=str(tmp_path / "data"),
    )
    user = f"user-{uuid.uuid4()}"
    token = mint_token(JWT_SECRET, user)
    with (
        ServeProcess(env, tmp_path, tmp_path / "serve.log") as server,
        httpx.Client(base_url=server.url, timeout=15.0, trust_env=False) as http,
    ):
        auth = {"Authorization": f"Bearer {token}"}
        for name in ("X-Big", "Authorization"):
            headers = {**auth, name: "a" * 1_048_576}
            try:
                answer = http.post("/tasks", json={"title": "big"}, headers=headers)
            except httpx.TransportError:
                pass  # the connection was closed: allowed, as long as the server lives on
            else:
                assert answer.status_code == 431, answer.status_code
                assert answer.headers["content-type"].startswith("application/problem+json")
        assert server.running
        assert http.get("/health").status_code == 200
        assert http.get("/tasks", headers=auth).json()["items"] == []
        # serve reads heads with BoundedHeadProtocol: over its limit, the protocol refused
        # them before the app saw them (and said so in the log).
        assert _sends_head_of(server.port, 4 * BoundedHeadProtocol.head_limit).startswith(
            b"HTTP/1.1 431 "
        )
    assert event_count(database_url, user) == 0
    assert "request head refused" in (tmp_path / "serve.log").read_text()


def _sends_head_of(port: int, size: int, pause: float = 0.0) -> bytes:
    """Sends a request head with a header line of `size` bytes (or, with `pause`, only its
    start, then waits): what the server answered, read until it closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: ")
        if pause:
            time.sleep(pause)
        else:
            chunk = b"a" * 65_536
            with contextlib.suppress(ConnectionError):  # the server may close while we send
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
                sock.sendall(b"\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionError):
            while data := sock.recv(65_536):
                answer += data
    return answer


class _QuickHeads(BoundedHeadProtocol):
    head_timeout = 0.5


def test_a_request_head_too_large_or_too_slow_is_refused_and_the_server_lives_on(
    settings: Settings,
) -> None:
    """httptools keeps a header line however long it grows, and waits for a head however
    slowly it comes; the protocol that `serve` runs bounds both (here its time limit is cut
    to half a second)."""
    port = db.free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, http=_QuickHeads, log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        started = time.monotonic()
        too_large = _sends_head_of(port, 64 * 1_048_576)  # 64 MB, if it read them all
        assert too_large.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert b"application/problem+json" in too_large and b'"status":431' in too_large
        assert time.monotonic() - started < 5  # refused early, not after 64 MB
        too_slow = _sends_head_of(port, 0, pause=1.5)
        assert too_slow.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), too_slow
        # Not HTTP at all: uvicorn's parser refuses it, answered as a problem too.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GARBAGE\r\n\r\n")
            not_http = b"".join(iter(lambda: sock.recv(65_536), b""))
        assert not_http.startswith(b"HTTP/1.1 400 Bad Request\r\n"), not_http
        assert b'"status":400' in not_http
        # After a request, in the same read: that request's answer, then the 400.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\nGARBAGE\r\n\r\n")
            both = b"".join(iter(lambda: sock.recv(65_536), b""))
        assert both.startswith(b"HTTP/1.1 200 OK\r\n"), both
        assert both.count(b"HTTP/1.1 ") == 2
        assert b'\r\n\r\n{"status":"ok"}HTTP/1.1 400 Bad Request\r\n' in both
        for answer in (too_large, too_slow, not_http):
            head = answer.partition(b"\r\n\r\n")[0].lower()
            assert b"\r\ncontent-type: application/problem+json\r\n" in head, answer
            assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", head), answer
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(100) == b""  # closed, with nothing to answer
            assert time.monotonic() - started < 5
        # A body is no part of the head: on a warm keep-alive connection (where reads come
        # 256 KiB at a time), a big one answers 413, and headers near 64 KiB with a body
        # near 64 KiB pass. Both used to count as head bytes and answer 431.
        token = mint_token(JWT_SECRET, f"user-{uuid.uuid4()}").encode()

        def post(body: bytes, extra: bytes = b"") -> bytes:
            return (
                b"POST /tasks HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + token
                + b"\r\nContent-Type: application/json\r\n" + extra
                + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )  # fmt: skip

        def status_of(sock: socket.socket) -> bytes:
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65_536)
            head, _, rest = answer.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])  # type: ignore[index]
            while len(rest) < length:
                rest += sock.recv(65_536)
            return head.split(b" ")[1]

        warm = post(json.dumps({"title": "t", "description": "d" * 9_000}).encode())
        many_headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 12) for i in range(3_000))
        near_limit = post(json.dumps({"title": "t", "description": "d" * 10_000}).encode(),
                          many_headers)  # fmt: skip
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(20):
                sock.sendall(warm)
                assert status_of(sock) == b"201"
            sock.sendall(near_limit)
            assert status_of(sock) == b"201"
            sock.sendall(post(b'{"title": "' + b"a" * 400_000 + b'"}'))
            assert status_of(sock) == b"413"
        # Within both limits (a long header, sent at once), the app answers as usual.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            assert http.get("/health", headers={"X-Big": "a" * 60_000}).status_code == 200
            assert http.get("/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


# --- SQL fragments ---------------------------------------------------------------------------


def _tables_intact(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for table in ("events", "tasks"):
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()


@pytest.mark.parametrize("fragment", SQL)
def test_sql_fragments_are_stored_verbatim(
    api: Api, other_api: Api, database_url: str, fragment: str
) -> None:
    other = other_api.create(title="someone else's")
    task = api.create(title=fragment, description=fragment, tags=[fragment, "x" + fragment])
    assert (task["title"], task["description"]) == (fragment.strip(), fragment)
    assert task["tags"] == [fragment, "x" + fragment]
    edited = api.patch(f"/tasks/{task['id']}", json={"title": "e" + fragment, "tags": [fragment]})
    assert edited.status_code == 200, edited.text
    shown = api.get(f"/tasks/{task['id']}").json()
    assert (shown["title"], shown["description"], shown["tags"]) == (
        "e" + fragment,
        fragment,
        [fragment],
    )
    # As filters: they match literally, and only this user's tasks.
    by_q = api.get("/tasks", params={"q": fragment})
    assert [t["id"] for t in by_q.json()["items"]] == [task["id"]]
    by_tag = api.get("/tasks", params={"tag": fragment})
    assert [t["id"] for t in by_tag.json()["items"]] == [task["id"]]
    assert api.get("/tasks", params={"tag": fragment + "x"}).json()["items"] == []
    # As a cursor, a path id, a time: refused, never run.
    before = event_count(database_url, api.user)
    assert api.get("/tasks", params={"cursor": fragment}).status_code == 400
    assert api.get(f"/tasks/{task['id']}/history", params={"cursor": fragment}).status_code == 400
    assert api.get(f"/tasks/{task['id']}", params={"as_of": fragment}).status_code == 400
    quoted = httpx.URL("/tasks/").join(fragment.replace("/", "%2F")).raw_path.decode()
    for method, suffix in (
        ("GET", ""),
        ("GET", "/history"),
        ("PATCH", ""),
        ("DELETE", ""),
        ("POST", "/complete"),
        ("POST", "/restore"),
    ):
        url = f"/tasks/{quoted}{suffix}"
        kwargs: dict[str, Any] = {"json": {"title": "x"}} if method == "PATCH" else {}
        assert api.request(method, url, **kwargs).status_code == 404, (method, url)
    assert event_count(database_url, api.user) == before
    _tables_intact(database_url)
    assert other_api.get(f"/tasks/{other['id']}").json() == other
