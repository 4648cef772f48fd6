"""Property tests (hypothesis) through the real app and database.

- Any sequence of commands on a task leaves its projection row equal to the fold of its
  events, with versions 1..N.
- Random JSON bodies, on create and on edit, never cause a 5xx.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import psycopg
from conftest import Api
from helpers import differences, event_streams, fold_streams, projection_rows, version_gaps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    min_size=0,
    max_size=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "title": text.filter(lambda s: s.strip() != ""),
        "description": text,
        "priority": st.sampled_from(["low", "medium", "high"]),
        "due_date": st.none() | st.dates().map(lambda d: d.isoformat()),
        "tags": st.lists(text.filter(bool), max_size=4, unique=True),
        "completed": st.booleans(),
    },
)
commands = st.one_of(
    fields.map(lambda body: ("PATCH", "", body)),
    st.sampled_from(
        [
            ("POST", "/complete", None),
            ("POST", "/reopen", None),
            ("DELETE", "", None),
            ("POST", "/restore", None),
        ]
    ),
)

_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(first=fields, steps=st.lists(commands, max_size=12))
def test_any_command_sequence_folds_to_the_projection(
    client: TestClient[Any], database_url: str, first: dict[str, Any], steps: list[Any]
) -> None:
    api = Api(client, f"prop-{uuid.uuid4()}")
    created = api.post(
        "/tasks", json={"title": "start", **{k: v for k, v in first.items() if k != "completed"}}
    )
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    for method, suffix, body in steps:
        r = api.request(method, f"/tasks/{task_id}{suffix}", json=body)
        assert r.status_code in (200, 204, 404, 409), r.text  # 404: deleted; 409: not deleted
    with psycopg.connect(database_url) as conn:
        streams = event_streams(conn, api.user)
        rows = projection_rows(conn, api.user)
    assert version_gaps(streams) == {}
    assert differences(rows, fold_streams(streams)) == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
bodies = json_values | st.dictionaries(
    st.sampled_from(["title", "description", "priority", "due_date", "tags", "completed", "x"]),
    json_values,
    max_size=6,
)


@_SETTINGS
@given(body=bodies)
def test_random_bodies_never_cause_a_server_error(client: TestClient[Any], body: Any) -> None:
    api = Api(client, f"fuzz-{uuid.uuid4()}")
    json = {"content": msgspec.json.encode(body), "headers": {"Content-Type": "application/json"}}
    created = api.post("/tasks", **json)
    assert created.status_code < 500, created.text
    assert created.status_code in (201, 400), created.text
    target = created.json()["id"] if created.status_code == 201 else api.create()["id"]
    edited = api.patch(f"/tasks/{target}", **json)
    assert edited.status_code in (200, 400), edited.text
