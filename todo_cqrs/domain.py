"""The task domain: commands, events, `decide` and `evolve`. Pure: no I/O, no project imports.

A task is its events. Its state is `fold(evolve, events)`; the command path, the projection
rebuild and time travel all fold with the one `evolve` below, so the projection equals a
replay by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any, Literal
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


class Recorded(msgspec.Struct, frozen=True, array_like=True):
    """An event in a task's stream: what `evolve` folds.

    Array-like, so the rebuild can decode a whole stream that the database aggregated as
    `[[task_id, version, occurred_at, {"type": ..., ...}], ...]` in one call.
    """

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


class BrokenStream(ValueError):
    """Stored events that no command writes (edited by hand, say): an event before its task's
    TaskCreated, or data that does not decode as its event type."""


# --- validation ---------------------------------------------------------------------------

# The fields a request body may carry, in the contract's order, with their JSON types.
_FIELD_TYPES: dict[str, Any] = {
    "title": str,
    "description": str,
    "priority": Priority,
    "due_date": date | None,
    "tags": list[str],
    "completed": bool,
}


def text_problem(value: str) -> str | None:
    """Why PostgreSQL text cannot hold this string, or None when it can."""
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def caseless(text: str) -> str:
    """Text as the `q` filter compares it, on the title and on `q` alike: Unicode's full
    case folding (`STRASSE` finds "Straße"), made here rather than by PostgreSQL's lower(),
    which follows the database's locale (in a C locale it changes only ASCII letters)."""
    return text.casefold()


def _field_problem(name: str, value: Any) -> str | None:
    """The contract's rule for one well-typed field, or None when the value keeps it."""
    if name == "title":
        if problem := text_problem(value):
            return problem
        if not 1 <= len(value) <= TITLE_MAX:  # the value is trimmed by now
            return f"must be 1 to {TITLE_MAX} characters after trimming"
    elif name == "description":
        if problem := text_problem(value):
            return problem
        if len(value) > DESCRIPTION_MAX:
            return f"must be at most {DESCRIPTION_MAX} characters"
    elif name == "tags":
        if len(value) > TAGS_MAX:
            return f"must hold at most {TAGS_MAX} tags"
        if len(set(value)) != len(value):
            return "must not hold the same tag twice"
        for tag in value:
            if problem := text_problem(tag):
                return f"each tag {problem}"
            if not 1 <= len(tag) <= TAG_MAX:
                return f"each tag must be 1 to {TAG_MAX} characters"
    return None


_BODY_FIELDS = {
    kind: [f.name for f in msgspec.structs.fields(kind)] for kind in (CreateTask, EditTask)
}


def parse_command(kind: type[CreateTask] | type[EditTask], body: Any) -> CreateTask | EditTask:
    """A decoded JSON body as a command, checked against every rule of the contract.

    Raises InvalidCommand listing every offending field (unknown ones included), so a client
    learns all that is wrong in one answer. The title is trimmed.
    """
    if not isinstance(body, dict):
        raise InvalidCommand([FieldError("body", "must be a JSON object")])
    allowed = _BODY_FIELDS[kind]
    values: dict[str, Any] = {}
    errors: list[FieldError] = []
    for name in allowed:
        if name not in body:
            if name == "title" and kind is CreateTask:
                errors.append(FieldError(name, "is required"))
            continue
        try:
            value = msgspec.convert(body[name], _FIELD_TYPES[name])
        except msgspec.ValidationError as error:
            errors.append(FieldError(name, str(error)))
            continue
        if name == "title":
            value = value.strip()
        if problem := _field_problem(name, value):
            errors.append(FieldError(name, problem))
        values[name] = value
    errors.extend(
        FieldError(str(name), "is not a field of this request")
        for name in body
        if name not in allowed
    )
    if errors:
        raise InvalidCommand(errors)
    return kind(**values)


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
    # In UTC whatever the TimeZone of the session that read the events: the JSON of a task
    # (answers, and the projection's `body`) shows its times with `Z`.
    event, at = recorded.event, recorded.occurred_at.astimezone(UTC)
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
        raise BrokenStream(f"{event_type(event)} before TaskCreated in task {recorded.task_id}")
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
