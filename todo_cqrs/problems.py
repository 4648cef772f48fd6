"""Problem answers (RFC 9457) shared by the command, query and HTTP layers."""

from __future__ import annotations

from http import HTTPStatus

import msgspec

from todo_cqrs.domain import FieldError

PROBLEM_JSON = "application/problem+json"


class ProblemBody(msgspec.Struct, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class Problem(Exception):
    """An answer of 4xx or 5xx, raised anywhere below the controllers."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def body(self) -> ProblemBody:
        return ProblemBody(
            type="about:blank",
            title=HTTPStatus(self.status).phrase,
            status=self.status,
            detail=self.detail,
            errors=self.errors,
        )

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())


def bad_parameter(name: str, message: str) -> Problem:
    """400 for one query parameter, named in `errors` as a body's fields are."""
    return Problem(400, f"{name} {message}.", errors=[FieldError(name, message)])


def not_found() -> Problem:
    # One answer for "no such task" and "another user's task": existence never leaks.
    return Problem(404, "No such task.")
