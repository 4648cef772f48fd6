"""Developer sessions: `nox -s tests`, `nox -s lint typecheck`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on a real PostgreSQL (TEST_DATABASE_URL, else an embedded one)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("mypy", "todo_cqrs")


@nox.session
def bench_rebuild(session: nox.Session) -> None:
    """Rebuild rate and memory on 10,000 users, 1,000,000 tasks, 5,000,000 events; writes
    BENCHMARKS.md. Smaller: `nox -s bench_rebuild -- --tasks 100000 --events 500000`."""
    session.install("-e", ".")
    session.run("python", "-m", "todo_cqrs.bench", "rebuild", *session.posargs)
