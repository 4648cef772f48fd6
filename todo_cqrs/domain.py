"""The task domain: commands, events, `decide` and `evolve`. Pure: no I/O, no project imports.

A task is its events. Its state is `fold(evolve, events)`; the command path, the projection
rebuild and time travel all fold with the one `evolve` below, so the projection equals a
replay by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import Literal
from uuid import UUID

import msgspec
from msgspec import UNSET, UnsetType
from msgspec.structs import replace

Priority = Literal["low", "medium", "high"]

TITLE_MAX = 500
DESCRIPTION_MAX = 10_000
TAGS_MAX = 20
TAG_MAX = 50


# --- the task (state and read model) ---------------------------------------------------------


class Task(msgspec.Struct, omit_defaults=True):
    """A task as it stands after its events.

    `deleted` is the only field with a default, and `omit_defaults` keeps it out of the JSON:
    a deleted task is never shown, so the API's task shape has no such field.
    """

    id: UUID
    title: str
    description: str
    completed: bool
    priority: Priority
    due_date: date | None
    tags: list[str]
    version: int
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    deleted: bool = False


# --- events (past tense; the stored `data` is the struct without its tag) -------------------


class TaskCreated(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    title: str
    description: str
    priority: Priority
    due_date: date | None
    tags: list[str]


class TaskRenamed(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    title: str


class TaskDescriptionChanged(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    description: str


class TaskPriorityChanged(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    priority: Priority


class TaskDueDateChanged(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    due_date: date | None


class TaskTagsChanged(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    tags: list[str]


class TaskCompleted(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


class TaskReopened(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


class TaskDeleted(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


class TaskRestored(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


Event = (
    TaskCreated
    | TaskRenamed
    | TaskDescriptionChanged
    | TaskPriorityChanged
    | TaskDueDateChanged
    | TaskTagsChanged
    | TaskCompleted
    | TaskReopened
    | TaskDeleted
    | TaskRestored
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        TaskCreated,
        TaskRenamed,
        TaskDescriptionChanged,
        TaskPriorityChanged,
        TaskDueDateChanged,
        TaskTagsChanged,
        TaskCompleted,
        TaskReopened,
        TaskDeleted,
        TaskRestored,
    )
}


def event_type(event: Event) -> str:
    return type(event).__name__


def event_data(event: Event) -> dict[str, object]:
    """The event's `data` as stored and shown: its fields, without the union's tag."""
    data = msgspec.to_builtins(event)
    assert isinstance(data, dict)
    del data["type"]
    return data


class Recorded(msgspec.Struct, frozen=True):
    """An event in a task's stream: what `evolve` folds."""

    task_id: UUID
    version: int
    occurred_at: datetime
    event: Event


# --- commands (imperative; the request bodies are decoded straight into them) ---------------


class CreateTask(msgspec.Struct, forbid_unknown_fields=True):
    title: str
    description: str = ""
    priority: Priority = "medium"
    due_date: date | None = None
    tags: list[str] = []


class EditTask(msgspec.Struct, forbid_unknown_fields=True):
    """A PATCH: the fields that were sent; UNSET ones are left as they are."""

    title: str | UnsetType = UNSET
    description: str | UnsetType = UNSET
    priority: Priority | UnsetType = UNSET
    due_date: date | UnsetType | None = UNSET
    tags: list[str] | UnsetType = UNSET
    completed: bool | UnsetType = UNSET


class CompleteTask(msgspec.Struct):
    pass


class ReopenTask(msgspec.Struct):
    pass


class DeleteTask(msgspec.Struct):
    pass


class RestoreTask(msgspec.Struct):
    pass


Command = CreateTask | EditTask | CompleteTask | ReopenTask | DeleteTask | RestoreTask


# --- errors -------------------------------------------------------------------------------------


class FieldError(msgspec.Struct):
    field: str
    message: str


class InvalidCommand(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors


class TaskNotFound(Exception):
    """No such task for this user, or it is deleted and the command is not a restore."""


class TaskNotDeleted(Exception):
    """A restore of a task that is not deleted."""


# --- validation -------------------------------------------------------------------------------


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def _check_title(value: str, errors: list[FieldError]) -> str:
    title = value.strip()
    problem = _string_problem(title)
    if problem is None and not 1 <= len(title) <= TITLE_MAX:
        problem = f"must be 1 to {TITLE_MAX} characters after trimming"
    if problem:
        errors.append(FieldError("title", problem))
    return title


def _check_description(value: str, errors: list[FieldError]) -> None:
    problem = _string_problem(value)
    if problem is None and len(value) > DESCRIPTION_MAX:
        problem = f"must be at most {DESCRIPTION_MAX} characters"
    if problem:
        errors.append(FieldError("description", problem))


def _check_tags(tags: list[str], errors: list[FieldError]) -> None:
    problem = None
    if len(tags) > TAGS_MAX:
        problem = f"must hold at most {TAGS_MAX} tags"
    elif len(set(tags)) != len(tags):
        problem = "must not hold the same tag twice"
    else:
        for tag in tags:
            problem = _string_problem(tag)
            if problem is None and not 1 <= len(tag) <= TAG_MAX:
                problem = f"each tag must be 1 to {TAG_MAX} characters"
            if problem:
                break
    if problem:
        errors.append(FieldError("tags", problem))


def validate(command: Command) -> Command:
    """Check the field rules of the contract; return the command with its title trimmed.

    Raises InvalidCommand listing every offending field. Types were checked when the body
    was decoded into the command.
    """
    errors: list[FieldError] = []
    if isinstance(command, CreateTask):
        title = _check_title(command.title, errors)
        _check_description(command.description, errors)
        _check_tags(command.tags, errors)
        command = replace(command, title=title)
    elif isinstance(command, EditTask):
        if not isinstance(command.title, UnsetType):
            command = replace(command, title=_check_title(command.title, errors))
        if not isinstance(command.description, UnsetType):
            _check_description(command.description, errors)
        if not isinstance(command.tags, UnsetType):
            _check_tags(command.tags, errors)
    if errors:
        raise InvalidCommand(errors)
    return command


# --- decide and evolve ------------------------------------------------------------------------


def decide(state: Task | None, command: Command) -> list[Event]:
    """The events a (validated) command causes on a task; [] when it changes nothing."""
    if isinstance(command, CreateTask):
        return [
            TaskCreated(
                title=command.title,
                description=command.description,
                priority=command.priority,
                due_date=command.due_date,
                tags=list(command.tags),
            )
        ]
    if state is None:
        raise TaskNotFound
    if isinstance(command, RestoreTask):
        if not state.deleted:
            raise TaskNotDeleted
        return [TaskRestored()]
    if state.deleted:
        raise TaskNotFound
    if isinstance(command, DeleteTask):
        return [TaskDeleted()]
    if isinstance(command, CompleteTask):
        return [] if state.completed else [TaskCompleted()]
    if isinstance(command, ReopenTask):
        return [TaskReopened()] if state.completed else []
    # EditTask: one event per changed field, in the contract's order.
    events: list[Event] = []
    if not isinstance(command.title, UnsetType) and command.title != state.title:
        events.append(TaskRenamed(title=command.title))
    if not isinstance(command.description, UnsetType) and command.description != state.description:
        events.append(TaskDescriptionChanged(description=command.description))
    if not isinstance(command.priority, UnsetType) and command.priority != state.priority:
        events.append(TaskPriorityChanged(priority=command.priority))
    if not isinstance(command.due_date, UnsetType) and command.due_date != state.due_date:
        events.append(TaskDueDateChanged(due_date=command.due_date))
    if not isinstance(command.tags, UnsetType) and command.tags != state.tags:
        events.append(TaskTagsChanged(tags=list(command.tags)))
    if not isinstance(command.completed, UnsetType) and command.completed != state.completed:
        events.append(TaskCompleted() if command.completed else TaskReopened())
    return events


def evolve(state: Task | None, recorded: Recorded) -> Task:
    """The task after one more event. The only place where events change state."""
    event, at = recorded.event, recorded.occurred_at
    if isinstance(event, TaskCreated):
        return Task(
            id=recorded.task_id,
            title=event.title,
            description=event.description,
            completed=False,
            priority=event.priority,
            due_date=event.due_date,
            tags=list(event.tags),
            version=recorded.version,
            created_at=at,
            updated_at=at,
            completed_at=None,
        )
    if state is None:
        raise ValueError(f"{event_type(event)} before TaskCreated in task {recorded.task_id}")
    state = replace(state, version=recorded.version, updated_at=at)
    if isinstance(event, TaskRenamed):
        return replace(state, title=event.title)
    if isinstance(event, TaskDescriptionChanged):
        return replace(state, description=event.description)
    if isinstance(event, TaskPriorityChanged):
        return replace(state, priority=event.priority)
    if isinstance(event, TaskDueDateChanged):
        return replace(state, due_date=event.due_date)
    if isinstance(event, TaskTagsChanged):
        return replace(state, tags=list(event.tags))
    if isinstance(event, TaskCompleted):
        return replace(state, completed=True, completed_at=at)
    if isinstance(event, TaskReopened):
        return replace(state, completed=False, completed_at=None)
    if isinstance(event, TaskDeleted):
        return replace(state, deleted=True)
    return replace(state, deleted=False)  # TaskRestored


def fold(events: Iterable[Recorded], state: Task | None = None) -> Task | None:
    for recorded in events:
        state = evolve(state, recorded)
    return state
