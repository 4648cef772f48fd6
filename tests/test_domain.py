"""Unit tests of the pure domain: validate, decide, evolve."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from uuid import uuid4

import pytest

from todo_cqrs.domain import (
    BrokenStream,
    CompleteTask,
    CreateTask,
    DeleteTask,
    EditTask,
    InvalidCommand,
    Recorded,
    ReopenTask,
    RestoreTask,
    Task,
    TaskCompleted,
    TaskCreated,
    TaskDeleted,
    TaskDescriptionChanged,
    TaskDueDateChanged,
    TaskNotDeleted,
    TaskNotFound,
    TaskPriorityChanged,
    TaskRenamed,
    TaskReopened,
    TaskRestored,
    TaskTagsChanged,
    decide,
    event_data,
    evolve,
    fold,
    parse_command,
)

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
TASK_ID = uuid4()


def replay(*events: object) -> Task:
    recorded = [
        Recorded(TASK_ID, version, T0 + timedelta(minutes=version), event)  # type: ignore[arg-type]
        for version, event in enumerate(events, start=1)
    ]
    state = fold(recorded)
    assert state is not None
    return state


CREATED = TaskCreated(title="Buy milk", description="", priority="medium", due_date=None, tags=[])


def test_created_task_has_the_contract_defaults() -> None:
    task = replay(CREATED)
    assert task == Task(
        id=TASK_ID,
        title="Buy milk",
        description="",
        completed=False,
        priority="medium",
        due_date=None,
        tags=[],
        version=1,
        created_at=T0 + timedelta(minutes=1),
        updated_at=T0 + timedelta(minutes=1),
        completed_at=None,
    )


def test_evolve_applies_every_event_and_counts_versions() -> None:
    task = replay(
        CREATED,
        TaskRenamed(title="Buy oat milk"),
        TaskDescriptionChanged(description="2 litres"),
        TaskPriorityChanged(priority="high"),
        TaskDueDateChanged(due_date=date(2026, 12, 1)),
        TaskTagsChanged(tags=["home", "shop"]),
        TaskCompleted(),
    )
    assert (task.title, task.description, task.priority) == ("Buy oat milk", "2 litres", "high")
    assert task.due_date == date(2026, 12, 1)
    assert task.tags == ["home", "shop"]
    assert task.completed and task.completed_at == T0 + timedelta(minutes=7)
    assert task.version == 7
    assert task.updated_at == T0 + timedelta(minutes=7)
    assert task.created_at == T0 + timedelta(minutes=1)


def test_reopen_clears_completed_at_and_delete_restore_keep_the_rest() -> None:
    task = replay(CREATED, TaskCompleted(), TaskReopened(), TaskDeleted())
    assert task.deleted and not task.completed and task.completed_at is None
    restored = evolve(task, Recorded(TASK_ID, 5, T0 + timedelta(hours=1), TaskRestored()))
    assert not restored.deleted and restored.title == "Buy milk" and restored.version == 5


def test_an_event_before_creation_is_refused() -> None:
    with pytest.raises(BrokenStream, match=f"TaskRenamed before TaskCreated in task {TASK_ID}"):
        evolve(None, Recorded(TASK_ID, 1, T0, TaskRenamed(title="x")))


def test_create_decides_one_task_created() -> None:
    command = parse_command(CreateTask, {"title": "  Buy milk \n", "tags": ["home"]})
    assert decide(None, command) == [
        TaskCreated(
            title="Buy milk", description="", priority="medium", due_date=None, tags=["home"]
        )
    ]


def test_edit_emits_one_event_per_changed_field_in_contract_order() -> None:
    task = replay(CREATED)
    command = EditTask(
        completed=True,
        tags=["a"],
        due_date=date(2027, 1, 1),
        priority="low",
        description="d",
        title="New",
    )
    assert decide(task, command) == [
        TaskRenamed(title="New"),
        TaskDescriptionChanged(description="d"),
        TaskPriorityChanged(priority="low"),
        TaskDueDateChanged(due_date=date(2027, 1, 1)),
        TaskTagsChanged(tags=["a"]),
        TaskCompleted(),
    ]


def test_edit_to_the_same_values_changes_nothing() -> None:
    task = replay(CREATED)
    assert decide(task, EditTask(title="Buy milk", priority="medium", completed=False)) == []
    assert decide(task, EditTask()) == []


def test_complete_and_reopen_are_no_ops_when_already_so() -> None:
    task = replay(CREATED)
    assert decide(task, ReopenTask()) == []
    assert decide(task, CompleteTask()) == [TaskCompleted()]
    done = replay(CREATED, TaskCompleted())
    assert decide(done, CompleteTask()) == []
    assert decide(done, ReopenTask()) == [TaskReopened()]


def test_deleted_task_refuses_everything_but_restore() -> None:
    deleted = replay(CREATED, TaskDeleted())
    for command in (EditTask(title="x"), CompleteTask(), ReopenTask(), DeleteTask()):
        with pytest.raises(TaskNotFound):
            decide(deleted, command)
    assert decide(deleted, RestoreTask()) == [TaskRestored()]
    with pytest.raises(TaskNotDeleted):
        decide(replay(CREATED), RestoreTask())
    with pytest.raises(TaskNotFound):
        decide(None, CompleteTask())


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"title": "   "}, ["title"]),
        ({"title": "x" * 501}, ["title"]),
        ({"title": "a\x00b"}, ["title"]),
        ({"title": "ok", "description": "d" * 10_001}, ["description"]),
        ({"title": "ok", "tags": ["a", "a"]}, ["tags"]),
        ({"title": "ok", "tags": [""]}, ["tags"]),
        ({"title": "ok", "tags": ["x" * 51]}, ["tags"]),
        ({"title": "ok", "tags": [str(i) for i in range(21)]}, ["tags"]),
        ({"title": "ok", "tags": [1]}, ["tags"]),
        ({"title": "ok", "priority": "urgent", "due_date": "2026-02-30"}, ["priority", "due_date"]),
        (
            {"title": "", "description": "\x00", "tags": ["a", "a"]},
            ["title", "description", "tags"],
        ),
        ({}, ["title"]),
        ({"title": None}, ["title"]),
        ({"title": "ok", "due": "2026-01-01", "x": 1}, ["due", "x"]),
        ({"title": "ok", "completed": True}, ["completed"]),
    ],
)
def test_create_lists_every_offending_field(body: dict[str, object], fields: list[str]) -> None:
    with pytest.raises(InvalidCommand) as raised:
        parse_command(CreateTask, body)
    assert [e.field for e in raised.value.errors] == fields


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"title": "\ud800"}, ["title"]),
        ({"title": " ", "description": "x" * 10_001}, ["title", "description"]),
        ({"completed": "yes"}, ["completed"]),
        ({"due_date": 5, "priority": None}, ["priority", "due_date"]),
    ],
)
def test_edit_lists_every_offending_field(body: dict[str, object], fields: list[str]) -> None:
    with pytest.raises(InvalidCommand) as raised:
        parse_command(EditTask, body)
    assert [e.field for e in raised.value.errors] == fields


def test_parse_accepts_the_limits_and_trims_the_title() -> None:
    command = parse_command(
        CreateTask,
        {
            "title": " " + "x" * 500 + "\n",
            "description": "d" * 10_000,
            "tags": [str(i) for i in range(20)],
        },
    )
    assert isinstance(command, CreateTask)
    assert command.title == "x" * 500
    assert parse_command(CreateTask, {"title": "ok", "tags": ["Home", "home"]}) == CreateTask(
        title="ok", tags=["Home", "home"]
    )
    assert parse_command(EditTask, {"due_date": None}) == EditTask(due_date=None)
    with pytest.raises(InvalidCommand):
        parse_command(CreateTask, ["not", "an", "object"])


def test_event_data_is_the_contract_data() -> None:
    assert event_data(TaskRenamed(title="x")) == {"title": "x"}
    assert event_data(TaskCompleted()) == {}
    assert event_data(CREATED) == {
        "title": "Buy milk",
        "description": "",
        "priority": "medium",
        "due_date": None,
        "tags": [],
    }
