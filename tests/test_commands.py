"""Contract tests of the write side through the real app: POST/PATCH/DELETE and the task
commands, If-Match and Idempotency-Key (API.md, "Commands")."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from conftest import assert_problem
from psycopg_pool import AsyncConnectionPool

from todo_cqrs import commands, projection

TASK_KEYS = {
    "id",
    "title",
    "description",
    "completed",
    "priority",
    "due_date",
    "tags",
    "version",
    "created_at",
    "updated_at",
    "completed_at",
}


def ts(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None, value
    return moment


def history(api: Any, task_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/tasks/{task_id}/history", params={"limit": 200})
    assert response.status_code == 200, response.text
    assert response.json()["next_cursor"] is None
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def types(api: Any, task_id: str) -> list[str]:
    return [event["type"] for event in history(api, task_id)]


def list_ids(api: Any) -> list[str]:
    response = api.get("/tasks", params={"limit": 200})
    assert response.status_code == 200, response.text
    return [task["id"] for task in response.json()["items"]]


# --- POST /tasks ------------------------------------------------------------------------------


def test_create_answers_201_with_location_etag_and_the_task(api: Any) -> None:
    response = api.post(
        "/tasks",
        json={
            "title": "Buy milk",
            "description": "two litres",
            "priority": "high",
            "due_date": "2026-11-30",
            "tags": ["home", "Shop", "a"],
        },
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    task = response.json()
    assert set(task) == TASK_KEYS
    uuid.UUID(task["id"])
    assert response.headers["location"] == f"/tasks/{task['id']}"
    assert response.headers["etag"] == '"1"'
    assert task["title"] == "Buy milk"
    assert task["description"] == "two litres"
    assert task["priority"] == "high"
    assert task["due_date"] == "2026-11-30"
    assert task["tags"] == ["home", "Shop", "a"]  # kept in the given order
    assert task["completed"] is False
    assert task["completed_at"] is None
    assert task["version"] == 1
    assert task["updated_at"] == task["created_at"]
    ts(task["created_at"])
    # Without a replica (QUERY_DATABASE_URL) every query reads the primary: no token to send.
    assert "x-consistency-token" not in response.headers

    fetched = api.get(f"/tasks/{task['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == task
    assert fetched.headers["etag"] == '"1"'


def test_create_defaults(api: Any) -> None:
    task = api.create(title="only a title")
    assert task["description"] == ""
    assert task["priority"] == "medium"
    assert task["due_date"] is None
    assert task["tags"] == []
    assert task["completed"] is False
    assert task["completed_at"] is None
    assert task["version"] == 1


def test_create_trims_title_as_str_strip_does(api: Any) -> None:
    task = api.create(title="\u2003\t  Buy milk \n\u00a0")
    assert task["title"] == "Buy milk"
    # description and tags are not trimmed
    task = api.create(title="x", description="  keep  ", tags=[" a "])
    assert task["description"] == "  keep  "
    assert task["tags"] == [" a "]


def test_create_appends_one_task_created_event_with_its_data(api: Any) -> None:
    task = api.create(title=" t ", priority="low", due_date="2027-01-02", tags=["x", "y"])
    events = history(api, task["id"])
    assert len(events) == 1
    event = events[0]
    assert event["type"] == "TaskCreated"
    assert event["version"] == 1
    assert event["task_id"] == task["id"]
    assert event["data"] == {
        "title": "t",
        "description": "",
        "priority": "low",
        "due_date": "2027-01-02",
        "tags": ["x", "y"],
    }
    assert ts(event["occurred_at"]) == ts(task["created_at"]) == ts(task["updated_at"])


# --- PATCH ------------------------------------------------------------------------------------


def test_patch_appends_one_event_per_changed_field_in_contract_order(api: Any) -> None:
    task = api.create(title="old", tags=["a"])
    response = api.patch(
        f"/tasks/{task['id']}",
        # sent in reverse order: the events still come in the contract's order
        json={
            "completed": True,
            "tags": ["b", "a"],
            "due_date": "2026-12-24",
            "priority": "high",
            "description": "new description",
            "title": "  new  ",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"7"'
    patched = response.json()
    assert set(patched) == TASK_KEYS
    assert patched["title"] == "new"
    assert patched["description"] == "new description"
    assert patched["priority"] == "high"
    assert patched["due_date"] == "2026-12-24"
    assert patched["tags"] == ["b", "a"]
    assert patched["completed"] is True
    assert patched["version"] == 7
    assert patched["created_at"] == task["created_at"]

    events = history(api, task["id"])
    assert [(e["version"], e["type"], e["data"]) for e in events[1:]] == [
        (2, "TaskRenamed", {"title": "new"}),
        (3, "TaskDescriptionChanged", {"description": "new description"}),
        (4, "TaskPriorityChanged", {"priority": "high"}),
        (5, "TaskDueDateChanged", {"due_date": "2026-12-24"}),
        (6, "TaskTagsChanged", {"tags": ["b", "a"]}),
        (7, "TaskCompleted", {}),
    ]
    assert ts(patched["updated_at"]) == ts(events[-1]["occurred_at"])
    assert ts(patched["completed_at"]) == ts(events[-1]["occurred_at"])
    assert api.get(f"/tasks/{task['id']}").json() == patched


def test_patch_only_changed_fields_make_events(api: Any) -> None:
    task = api.create(title="same", priority="low", tags=["a", "b"])
    response = api.patch(
        f"/tasks/{task['id']}",
        json={"title": " same ", "priority": "high", "tags": ["a", "b"], "due_date": None},
    )
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2
    assert types(api, task["id"]) == ["TaskCreated", "TaskPriorityChanged"]


def test_patch_due_date_to_null_and_reopen_through_patch(api: Any) -> None:
    task = api.create(due_date="2026-01-01")
    api.patch(f"/tasks/{task['id']}", json={"completed": True})
    response = api.patch(f"/tasks/{task['id']}", json={"due_date": None, "completed": False})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["due_date"] is None
    assert body["completed"] is False
    assert body["completed_at"] is None
    events = history(api, task["id"])
    assert [(e["type"], e["data"]) for e in events[1:]] == [
        ("TaskCompleted", {}),
        ("TaskDueDateChanged", {"due_date": None}),
        ("TaskReopened", {}),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": "t", "description": "d", "priority": "low", "due_date": "2026-05-06"},
        {"tags": ["x", "y"], "completed": False},
        {"title": "\tt  "},
    ],
)
def test_noop_patch_appends_nothing_and_answers_200(api: Any, body: dict[str, Any]) -> None:
    task = api.create(
        title="t", description="d", priority="low", due_date="2026-05-06", tags=["x", "y"]
    )
    response = api.patch(f"/tasks/{task['id']}", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == task
    assert response.headers["etag"] == '"1"'
    assert types(api, task["id"]) == ["TaskCreated"]


def test_updated_at_is_the_time_of_the_latest_event(api: Any) -> None:
    task = api.create()
    renamed = api.patch(f"/tasks/{task['id']}", json={"title": "renamed"}).json()
    events = history(api, task["id"])
    assert ts(renamed["updated_at"]) == ts(events[-1]["occurred_at"])
    assert ts(renamed["updated_at"]) > ts(renamed["created_at"])
    assert renamed["created_at"] == task["created_at"]


# --- complete / reopen ------------------------------------------------------------------------


def test_a_tasks_event_times_never_go_back(api: Any, database_url: str) -> None:
    """Event times come from the clock of the process that runs the command, and hosts'
    clocks differ: a task last changed by a host whose clock is an hour ahead gets its next
    event at that time, not earlier, so time travel by `as_of` sees the events in order."""
    task = api.create(title="clock")
    ahead = datetime.now(UTC) + timedelta(hours=1)
    with psycopg.connect(database_url) as conn:  # as if a host an hour ahead had created it
        conn.execute(
            "UPDATE events SET occurred_at = %s WHERE user_id = %s AND task_id = %s",
            (ahead, api.user, task["id"]),
        )
        conn.execute(
            "UPDATE tasks SET created_at = %(at)s, updated_at = %(at)s, body = jsonb_set("
            " jsonb_set(body::jsonb, '{created_at}', to_jsonb(%(at)s::timestamptz)),"
            " '{updated_at}', to_jsonb(%(at)s::timestamptz))::text"
            " WHERE user_id = %(user)s AND task_id = %(task)s",
            {"at": ahead, "user": api.user, "task": task["id"]},
        )
    renamed = api.patch(f"/tasks/{task['id']}", json={"title": "later"})
    assert renamed.status_code == 200, renamed.text
    assert ts(renamed.json()["updated_at"]) == ahead
    assert [ts(event["occurred_at"]) for event in history(api, task["id"])] == [ahead, ahead]
    # ... while a task whose last event is in the past gets the process's own time.
    before = datetime.now(UTC)
    later = api.patch(f"/tasks/{api.create(title='now')['id']}", json={"title": "now 2"})
    assert before <= ts(later.json()["updated_at"]) <= datetime.now(UTC)


def test_complete_and_reopen(api: Any) -> None:
    task = api.create()
    completed = api.post(f"/tasks/{task['id']}/complete")
    assert completed.status_code == 200, completed.text
    assert completed.headers["etag"] == '"2"'
    body = completed.json()
    assert set(body) == TASK_KEYS
    assert body["completed"] is True
    assert body["version"] == 2
    events = history(api, task["id"])
    assert events[-1]["type"] == "TaskCompleted"
    assert events[-1]["data"] == {}
    assert ts(body["completed_at"]) == ts(events[-1]["occurred_at"]) == ts(body["updated_at"])

    reopened = api.post(f"/tasks/{task['id']}/reopen")
    assert reopened.status_code == 200, reopened.text
    assert reopened.headers["etag"] == '"3"'
    body = reopened.json()
    assert body["completed"] is False
    assert body["completed_at"] is None
    assert body["version"] == 3
    events = history(api, task["id"])
    assert [e["type"] for e in events] == ["TaskCreated", "TaskCompleted", "TaskReopened"]
    assert events[-1]["data"] == {}
    assert ts(body["updated_at"]) == ts(events[-1]["occurred_at"])


def test_complete_of_a_completed_task_appends_nothing(api: Any) -> None:
    task = api.create()
    first = api.post(f"/tasks/{task['id']}/complete").json()
    again = api.post(f"/tasks/{task['id']}/complete")
    assert again.status_code == 200, again.text
    assert again.json() == first
    assert again.headers["etag"] == '"2"'
    assert types(api, task["id"]) == ["TaskCreated", "TaskCompleted"]


def test_reopen_of_an_open_task_appends_nothing(api: Any) -> None:
    task = api.create()
    again = api.post(f"/tasks/{task['id']}/reopen")
    assert again.status_code == 200, again.text
    assert again.json() == task
    assert again.headers["etag"] == '"1"'
    assert types(api, task["id"]) == ["TaskCreated"]


def test_commands_on_an_unknown_task_answer_404(api: Any) -> None:
    missing = uuid.uuid4()
    assert_problem(api.patch(f"/tasks/{missing}", json={"title": "x"}), 404)
    assert_problem(api.post(f"/tasks/{missing}/complete"), 404)
    assert_problem(api.post(f"/tasks/{missing}/reopen"), 404)
    assert_problem(api.post(f"/tasks/{missing}/restore"), 404)
    assert_problem(api.delete(f"/tasks/{missing}"), 404)


# --- DELETE and restore -----------------------------------------------------------------------


def test_delete_answers_204_then_the_task_is_gone_but_its_history_stays(api: Any) -> None:
    task = api.create()
    kept = api.create(title="kept")
    response = api.delete(f"/tasks/{task['id']}")
    assert response.status_code == 204, response.text
    assert response.content == b""

    assert_problem(api.get(f"/tasks/{task['id']}"), 404)
    assert_problem(api.patch(f"/tasks/{task['id']}", json={"title": "x"}), 404)
    assert_problem(api.post(f"/tasks/{task['id']}/complete"), 404)
    assert_problem(api.post(f"/tasks/{task['id']}/reopen"), 404)
    assert_problem(api.delete(f"/tasks/{task['id']}"), 404)
    assert list_ids(api) == [kept["id"]]

    events = history(api, task["id"])
    assert [(e["version"], e["type"], e["data"]) for e in events] == [
        (1, "TaskCreated", events[0]["data"]),
        (2, "TaskDeleted", {}),
    ]


def test_restore_brings_the_task_back_as_it_was(api: Any) -> None:
    task = api.create(
        title="t", description="d", priority="high", tags=["a"], due_date="2026-03-04"
    )
    before = api.post(f"/tasks/{task['id']}/complete").json()
    assert api.delete(f"/tasks/{task['id']}").status_code == 204

    response = api.post(f"/tasks/{task['id']}/restore")
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"4"'
    restored = response.json()
    assert set(restored) == TASK_KEYS
    for field in TASK_KEYS - {"version", "updated_at"}:
        assert restored[field] == before[field], field
    assert restored["version"] == 4
    events = history(api, task["id"])
    assert [e["type"] for e in events] == [
        "TaskCreated",
        "TaskCompleted",
        "TaskDeleted",
        "TaskRestored",
    ]
    assert events[-1]["data"] == {}
    assert ts(restored["updated_at"]) == ts(events[-1]["occurred_at"])
    assert api.get(f"/tasks/{task['id']}").json() == restored
    assert list_ids(api) == [task["id"]]


def test_restore_of_a_task_that_is_not_deleted_answers_409(api: Any) -> None:
    task = api.create()
    assert_problem(api.post(f"/tasks/{task['id']}/restore"), 409)
    assert types(api, task["id"]) == ["TaskCreated"]
    api.delete(f"/tasks/{task['id']}")
    assert api.post(f"/tasks/{task['id']}/restore").status_code == 200
    assert_problem(api.post(f"/tasks/{task['id']}/restore"), 409)
    assert types(api, task["id"]) == ["TaskCreated", "TaskDeleted", "TaskRestored"]


# --- If-Match ---------------------------------------------------------------------------------


def test_if_match_matching_version_is_accepted(api: Any) -> None:
    task = api.create()
    response = api.patch(f"/tasks/{task['id']}", json={"title": "b"}, headers={"If-Match": '"1"'})
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"2"'
    response = api.post(f"/tasks/{task['id']}/complete", headers={"If-Match": '"2"'})
    assert response.status_code == 200, response.text
    response = api.post(f"/tasks/{task['id']}/reopen", headers={"If-Match": '"3"'})
    assert response.status_code == 200, response.text
    response = api.delete(f"/tasks/{task['id']}", headers={"If-Match": '"4"'})
    assert response.status_code == 204, response.text
    response = api.post(f"/tasks/{task['id']}/restore", headers={"If-Match": '"5"'})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 6


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("PATCH", "", {"title": "changed"}),
        ("POST", "/complete", None),
        ("DELETE", "", None),
    ],
)
def test_if_match_mismatch_answers_412_and_appends_nothing(
    api: Any, method: str, suffix: str, body: Any
) -> None:
    task = api.create()
    api.patch(f"/tasks/{task['id']}", json={"title": "v2"})
    kwargs: dict[str, Any] = {"headers": {"If-Match": '"1"'}}
    if body is not None:
        kwargs["json"] = body
    response = api.request(method, f"/tasks/{task['id']}{suffix}", **kwargs)
    assert_problem(response, 412)
    assert types(api, task["id"]) == ["TaskCreated", "TaskRenamed"]
    current = api.get(f"/tasks/{task['id']}")
    assert current.status_code == 200
    assert current.json()["version"] == 2
    assert current.json()["title"] == "v2"


def test_if_match_mismatch_on_reopen_answers_412(api: Any) -> None:
    task = api.create()
    api.post(f"/tasks/{task['id']}/complete")
    assert_problem(api.post(f"/tasks/{task['id']}/reopen", headers={"If-Match": '"1"'}), 412)
    assert types(api, task["id"]) == ["TaskCreated", "TaskCompleted"]


def test_if_match_star_matches_any_version(api: Any) -> None:
    task = api.create()
    response = api.patch(f"/tasks/{task['id']}", json={"title": "b"}, headers={"If-Match": "*"})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2


def test_if_match_list_matches_when_any_tag_does(api: Any) -> None:
    task = api.create()
    response = api.patch(
        f"/tasks/{task['id']}", json={"title": "b"}, headers={"If-Match": '"7", "1", "9"'}
    )
    assert response.status_code == 200, response.text
    response = api.patch(
        f"/tasks/{task['id']}", json={"title": "c"}, headers={"If-Match": '"1", "3"'}
    )
    assert_problem(response, 412)
    assert types(api, task["id"]) == ["TaskCreated", "TaskRenamed"]


def test_if_match_weak_tag_never_matches(api: Any) -> None:
    task = api.create()
    api.patch(f"/tasks/{task['id']}", json={"title": "b"})
    api.patch(f"/tasks/{task['id']}", json={"title": "c"})
    response = api.patch(f"/tasks/{task['id']}", json={"title": "d"}, headers={"If-Match": 'W/"3"'})
    assert_problem(response, 412)
    assert_problem(api.post(f"/tasks/{task['id']}/complete", headers={"If-Match": 'W/"3"'}), 412)
    assert types(api, task["id"]) == ["TaskCreated", "TaskRenamed", "TaskRenamed"]


@pytest.mark.parametrize("header", ["1", '"1', "W/1", '"1" "2"', "abc", '" 1"', "", ","])
def test_malformed_if_match_answers_400(api: Any, header: str) -> None:
    task = api.create()
    response = api.patch(f"/tasks/{task['id']}", json={"title": "b"}, headers={"If-Match": header})
    assert_problem(response, 400)
    assert types(api, task["id"]) == ["TaskCreated"]


def test_a_long_malformed_if_match_is_refused_in_linear_time(api: Any) -> None:
    """60,000 spaces before a bad character: a backtracking parser took ~20 s (quadratic),
    blocking the worker's event loop; the answer must come as fast as for a short header."""
    task = api.create()
    header = '"1",' + " " * 60_000 + "x"
    started = time.monotonic()
    response = api.patch(f"/tasks/{task['id']}", json={"title": "b"}, headers={"If-Match": header})
    assert_problem(response, 400)
    assert time.monotonic() - started < 2.0
    assert types(api, task["id"]) == ["TaskCreated"]


def test_if_match_list_may_hold_empty_members(api: Any) -> None:
    """RFC 9110 5.6.1: a recipient accepts empty list members."""
    task = api.create()
    response = api.patch(
        f"/tasks/{task['id']}", json={"title": "b"}, headers={"If-Match": ', "1",'}
    )
    assert response.status_code == 200, response.text


def test_if_match_on_create_is_ignored_even_when_malformed(api: Any) -> None:
    for header in ['"9"', "bad"]:
        response = api.post("/tasks", json={"title": "a"}, headers={"If-Match": header})
        assert response.status_code == 201, response.text


def test_if_match_on_restore_of_a_deleted_task_is_checked_first(api: Any) -> None:
    task = api.create()
    api.delete(f"/tasks/{task['id']}")  # version 2
    assert_problem(api.post(f"/tasks/{task['id']}/restore", headers={"If-Match": '"1"'}), 412)
    assert types(api, task["id"]) == ["TaskCreated", "TaskDeleted"]
    response = api.post(f"/tasks/{task['id']}/restore", headers={"If-Match": '"2"'})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 3


def test_if_match_on_restore_of_a_live_task_is_checked_before_409(api: Any) -> None:
    task = api.create()
    assert_problem(api.post(f"/tasks/{task['id']}/restore", headers={"If-Match": '"5"'}), 412)
    assert_problem(api.post(f"/tasks/{task['id']}/restore", headers={"If-Match": '"1"'}), 409)


def test_commands_on_a_deleted_task_answer_404_even_with_if_match(api: Any) -> None:
    """A deleted task is gone from commands (404); only restore sees it, If-Match or not."""
    task = api.create()
    api.delete(f"/tasks/{task['id']}")  # version 2
    for header in ('"2"', '"1"'):
        response = api.patch(
            f"/tasks/{task['id']}", json={"title": "x"}, headers={"If-Match": header}
        )
        assert_problem(response, 404)
        assert_problem(api.post(f"/tasks/{task['id']}/complete", headers={"If-Match": header}), 404)
    assert types(api, task["id"]) == ["TaskCreated", "TaskDeleted"]


# --- Idempotency-Key --------------------------------------------------------------------------


def test_idempotent_create_replays_the_first_answer(api: Any) -> None:
    key = {"Idempotency-Key": f"create-{uuid.uuid4()}"}
    first = api.post(
        "/tasks",
        content=b'{"title": "pay rent", "priority": "high", "tags": ["home"]}',
        headers={**key, "Content-Type": "application/json"},
    )
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers

    # JSON-equal body: other key order, other spacing; other headers do not count
    retry = api.post(
        "/tasks",
        content=b'{"tags":["home"],"priority":"high","title":"pay rent"}',
        headers={**key, "Content-Type": "application/json", "X-Request-ID": "another-one"},
    )
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["location"] == first.headers["location"]
    assert retry.headers["etag"] == first.headers["etag"] == '"1"'
    assert list_ids(api) == [first.json()["id"]]
    assert types(api, first.json()["id"]) == ["TaskCreated"]


def test_idempotent_patch_replays_and_appends_nothing(api: Any) -> None:
    task = api.create()
    key = {"Idempotency-Key": "rename-1"}
    first = api.patch(f"/tasks/{task['id']}", json={"title": "b", "priority": "low"}, headers=key)
    assert first.status_code == 200, first.text
    assert first.headers["etag"] == '"3"'
    api.patch(f"/tasks/{task['id']}", json={"title": "c"})  # the task moves on
    retry = api.patch(f"/tasks/{task['id']}", json={"priority": "low", "title": "b"}, headers=key)
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["etag"] == '"3"'
    assert types(api, task["id"]) == [
        "TaskCreated",
        "TaskRenamed",
        "TaskPriorityChanged",
        "TaskRenamed",
    ]
    assert api.get(f"/tasks/{task['id']}").json()["title"] == "c"


def test_idempotent_delete_and_complete_replay(api: Any) -> None:
    task = api.create()
    first = api.post(f"/tasks/{task['id']}/complete", headers={"Idempotency-Key": "c"})
    assert first.status_code == 200
    api.post(f"/tasks/{task['id']}/reopen")
    retry = api.post(f"/tasks/{task['id']}/complete", headers={"Idempotency-Key": "c"})
    assert retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["etag"] == '"2"'
    assert types(api, task["id"]) == ["TaskCreated", "TaskCompleted", "TaskReopened"]

    first = api.delete(f"/tasks/{task['id']}", headers={"Idempotency-Key": "d"})
    assert first.status_code == 204
    retry = api.delete(f"/tasks/{task['id']}", headers={"Idempotency-Key": "d"})
    assert retry.status_code == 204
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == b""
    assert types(api, task["id"]) == [
        "TaskCreated",
        "TaskCompleted",
        "TaskReopened",
        "TaskDeleted",
    ]


def test_same_key_with_a_different_body_answers_422(api: Any) -> None:
    key = {"Idempotency-Key": "k-422"}
    first = api.post("/tasks", json={"title": "one"}, headers=key)
    assert first.status_code == 201
    assert_problem(api.post("/tasks", json={"title": "two"}, headers=key), 422)
    assert list_ids(api) == [first.json()["id"]]


def test_same_key_with_a_different_path_or_method_answers_422(api: Any) -> None:
    task = api.create()
    other = api.create()
    key = {"Idempotency-Key": "k-path"}
    assert api.post(f"/tasks/{task['id']}/complete", headers=key).status_code == 200
    assert_problem(api.post(f"/tasks/{other['id']}/complete", headers=key), 422)
    assert_problem(api.post(f"/tasks/{task['id']}/reopen", headers=key), 422)
    assert_problem(api.delete(f"/tasks/{task['id']}", headers=key), 422)
    assert types(api, other["id"]) == ["TaskCreated"]
    assert types(api, task["id"]) == ["TaskCreated", "TaskCompleted"]


def test_same_key_path_and_body_with_another_method_answers_422(api: Any) -> None:
    """The method alone makes a different request (the cases above change the path too)."""
    task = api.create()
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    assert_problem(api.request("PATCH", f"/tasks/{task['id']}", headers=key), 415)  # stored
    assert_problem(api.delete(f"/tasks/{task['id']}", headers=key), 422)
    assert types(api, task["id"]) == ["TaskCreated"]


def test_a_key_whose_first_request_has_not_committed_answers_409(
    api: Any, database_url: str
) -> None:
    """At once, not after the first request finishes (it holds the (user, key) lock)."""
    key = f"k-{uuid.uuid4()}"
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", (api.user, key))
        timer = threading.Timer(3.0, conn.rollback)  # a service that waited would not hang
        timer.start()
        try:
            started = time.monotonic()
            answer = api.post("/tasks", json={"title": "x"}, headers={"Idempotency-Key": key})
            assert time.monotonic() - started < 2.5
            assert_problem(answer, 409)
        finally:
            timer.cancel()
    assert list_ids(api) == []


def test_answers_are_kept_24_hours_then_pruned(database_url: str) -> None:
    user = f"prune-{uuid.uuid4()}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        for key, age in (("kept", "23 hours 59 minutes"), ("pruned", "24 hours 1 minute")):
            conn.execute(
                "INSERT INTO idempotency_keys (user_id, key, fingerprint, status, body,"
                " created_at) VALUES (%s, %s, 'f', 201, '{}', now() - %s::interval)",
                (user, key, age),
            )

    async def prune() -> None:
        async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as pool:
            await commands.prune_idempotency_keys(pool)

    asyncio.run(prune())
    with psycopg.connect(database_url) as conn:
        kept = conn.execute("SELECT key FROM idempotency_keys WHERE user_id = %s", (user,))
        assert [row[0] for row in kept] == ["kept"]


def test_a_server_error_is_never_kept_under_a_key_nor_shown(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5xx is not a final answer: the retry runs the command. The 500's body says
    nothing of the error itself."""
    task = api.create()
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("boom: secret internals")

    with monkeypatch.context() as patched:
        patched.setattr(projection, "load_task", broken)
        failed = api.patch(f"/tasks/{task['id']}", json={"title": "new"}, headers=key)
    assert_problem(failed, 500)
    assert "secret internals" not in failed.text and "Traceback" not in failed.text
    retry = api.patch(f"/tasks/{task['id']}", json={"title": "new"}, headers=key)
    assert retry.status_code == 200, retry.text
    assert "idempotent-replayed" not in retry.headers
    assert retry.json()["title"] == "new"


@pytest.mark.parametrize(
    "key",
    [b"", b"k" * 256, "cl\u00e9".encode(), "\u043a\u043b\u044e\u0447".encode(), b"k\x7f"],
    ids=["empty", "256-chars", "latin-1", "cyrillic", "DEL"],
)
def test_bad_idempotency_key_answers_400(api: Any, key: bytes) -> None:
    assert_problem(api.post("/tasks", json={"title": "x"}, headers={"Idempotency-Key": key}), 400)
    assert list_ids(api) == []


def test_idempotency_key_of_255_printable_characters_is_accepted(api: Any) -> None:
    key = ("a-Z_0 ~!" * 40)[:255]
    first = api.post("/tasks", json={"title": "x"}, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    retry = api.post("/tasks", json={"title": "x"}, headers={"Idempotency-Key": key})
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(list_ids(api)) == 1


def test_idempotency_keys_are_per_user(api: Any, other_api: Any) -> None:
    key = {"Idempotency-Key": "shared-key"}
    mine = api.post("/tasks", json={"title": "mine"}, headers=key)
    assert mine.status_code == 201
    # the very same request under the same key by another user is theirs, not a replay
    theirs = other_api.post("/tasks", json={"title": "mine"}, headers=key)
    assert theirs.status_code == 201, theirs.text
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != mine.json()["id"]
    # and their key is now spent for them alone
    assert_problem(other_api.post("/tasks", json={"title": "other"}, headers=key), 422)
    retry = api.post("/tasks", json={"title": "mine"}, headers=key)
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == mine.content
    assert list_ids(api) == [mine.json()["id"]]
    assert list_ids(other_api) == [theirs.json()["id"]]


def test_stored_404_replays(api: Any) -> None:
    missing = uuid.uuid4()
    key = {"Idempotency-Key": "k-404"}
    first = api.post(f"/tasks/{missing}/complete", headers=key)
    assert_problem(first, 404)
    assert "idempotent-replayed" not in first.headers
    retry = api.post(f"/tasks/{missing}/complete", headers=key)
    assert_problem(retry, 404)
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content


def test_stored_412_replays_even_without_the_if_match_header(api: Any) -> None:
    task = api.create()
    key = {"Idempotency-Key": "k-412"}
    first = api.patch(
        f"/tasks/{task['id']}", json={"title": "b"}, headers={**key, "If-Match": '"9"'}
    )
    assert_problem(first, 412)
    assert first.headers["etag"] == '"1"'  # the current version, as without a key
    # headers are not part of the comparison: the stored 412 comes back, nothing is appended
    retry = api.patch(f"/tasks/{task['id']}", json={"title": "b"}, headers=key)
    assert_problem(retry, 412)
    assert retry.headers["etag"] == '"1"'
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert types(api, task["id"]) == ["TaskCreated"]


def test_stored_409_replays(api: Any) -> None:
    task = api.create()
    key = {"Idempotency-Key": "k-409"}
    first = api.post(f"/tasks/{task['id']}/restore", headers=key)
    assert_problem(first, 409)
    api.delete(f"/tasks/{task['id']}")
    retry = api.post(f"/tasks/{task['id']}/restore", headers=key)
    assert_problem(retry, 409)
    assert retry.headers["idempotent-replayed"] == "true"
    assert types(api, task["id"]) == ["TaskCreated", "TaskDeleted"]


def test_stored_400_replays(api: Any) -> None:
    """Any 4xx is a final answer: a refused body under a key is kept like any other."""
    key = {"Idempotency-Key": "k-400"}
    first = api.post("/tasks", json={"title": "   "}, headers=key)
    assert_problem(first, 400)
    retry = api.post("/tasks", json={"title": "   "}, headers=key)
    assert_problem(retry, 400)
    assert retry.headers.get("idempotent-replayed") == "true"
    # the key is spent: another request under it is a different request
    assert_problem(api.post("/tasks", json={"title": "fine"}, headers=key), 422)
    assert list_ids(api) == []


def test_idempotency_key_is_recorded_in_event_meta(api: Any) -> None:
    response = api.post("/tasks", json={"title": "x"}, headers={"Idempotency-Key": "meta-key"})
    task = response.json()
    api.patch(f"/tasks/{task['id']}", json={"title": "y"})
    events = history(api, task["id"])
    assert events[0]["meta"]["idempotency_key"] == "meta-key"
    assert events[1]["meta"]["idempotency_key"] is None
