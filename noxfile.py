"""Developer sessions: `nox -s tests`, `nox -s lint typecheck`; benchmarks: `nox -s bench`,
`nox -s bench_rebuild`."""

from __future__ import annotations

import os
import shutil

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


def _apt_install(session: nox.Session, tool: str, package: str) -> None:
    """Install a missing command-line tool with apt-get (sudo when not root), saying so."""
    if shutil.which(tool):
        return
    if shutil.which("apt-get") is None:
        session.error(f"{tool} is missing and there is no apt-get here: install {package}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    session.log(f"{tool} is missing: installing the {package} package with apt-get")
    session.run(*sudo, "apt-get", "update", external=True)
    session.run(
        *sudo, "apt-get", "install", "-y", "--no-install-recommends", package, external=True
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The HTTP API under wrk, against pgbench's ceiling for the same SQL; writes
    BENCHMARKS.md. `nox -s bench -- --smoke` (seconds, writes nothing), `-- --duration 5`,
    `-- --workers 4`, `-- --big` (10,000 users, 1,000,000 tasks, 5,000,000 events)."""
    _apt_install(session, "wrk", "wrk")
    _apt_install(session, "pgbench", "postgresql-client")
    session.install("-e", ".")
    session.run("python", "-m", "todo_cqrs.bench", "api", *session.posargs)


@nox.session
def bench_instructions(session: nox.Session) -> None:
    """Instructions per request (get, list, create, patch) of one service process, counted
    by callgrind: repeatable where requests/s are not; writes BENCHMARKS.md.
    `-- --requests 200` for more requests of each kind (default 100)."""
    _apt_install(session, "valgrind", "valgrind")
    session.install("-e", ".")
    session.run("python", "-m", "todo_cqrs.bench", "instructions", *session.posargs)
