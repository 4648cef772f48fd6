"""Helpers of the process-level tests: a real `todo-cqrs serve` process, the command line,
and the fold of the event table that the projection must equal.

Every wait here is bounded: a process that does not start, answer or stop in time fails the
test and is killed, never left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from uuid import UUID

import httpx
import msgspec
import psutil
import psycopg

from todo_cqrs import db
from todo_cqrs.domain import Recorded, Task, fold
from todo_cqrs.eventstore import decode_event
from todo_cqrs.projection import TASK_COLUMNS, task_from_row

_SCRIPT = Path(sys.executable).with_name("todo-cqrs")
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "todo_cqrs.cli"]

Key = tuple[str, UUID]  # (user_id, task_id): one task stream


# --- the command line -----------------------------------------------------------------------


def service_env(**extra: str) -> dict[str, str]:
    """This environment without the service's own variables (a developer's DATABASE_URL or
    TODO_* must not leak into a test), plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TODO_")
        and name not in {"DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR", "TEST_DATABASE_URL"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, env: Mapping[str, str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def http_client(base_url: str, token: str | None = None, **kwargs: Any) -> httpx.Client:
    """A client for the loopback service; proxies from the environment are ignored."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=15.0, trust_env=False, **kwargs)


class ServeProcess:
    """`todo-cqrs serve` on a free loopback port, in its own session (so it and its workers
    can be killed as one process group), its output in `log_path`."""

    def __init__(
        self,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        *,
        workers: int = 1,
        start_timeout: float = 60.0,
    ) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.port = db.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if workers != 1:
            args += ["--workers", str(workers)]
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [*CLI, *args],
            env=self.env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._family: list[psutil.Process] = []
        try:
            self._wait_healthy(start_timeout)
        except BaseException:
            self.kill()
            self.close()
            raise

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"serve exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False)
                if response.status_code == 200:
                    self._remember_family()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"serve did not answer /health within {timeout} s:\n{self.log_tail()}")

    def _remember_family(self) -> None:
        """The serve process and its workers, to make sure none outlives the test."""
        try:
            main = psutil.Process(self.process.pid)
            self._family = [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            self._family = []

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM to the serve process (as a supervisor sends it); its exit status."""
        self._remember_family()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"serve did not stop within {timeout} s of SIGTERM:\n{self.log_tail()}"
            ) from None
        finally:
            self._reap_family()

    def kill(self) -> None:
        """SIGKILL to the whole process group: serve and its workers die at once, as in a
        crash. (An embedded PostgreSQL is not in the group: pg_ctl starts it in a session
        of its own.)"""
        self._remember_family()
        if self.process.poll() is None:
            # The leader is our unreaped child, so its group id is still ours to signal.
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(15)
        self._reap_family()

    def _reap_family(self) -> None:
        for member in self._family:
            try:
                if member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
                    member.kill()
            except psutil.NoSuchProcess:
                pass
        self._family = []

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(AssertionError):
                self.terminate()
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- the event table and its fold ------------------------------------------------------------


def event_streams(
    conn: psycopg.Connection[Any], user_id: str | None = None
) -> dict[Key, list[Recorded]]:
    """Every task stream (of one user, or of all), its events in version order."""
    cur = conn.execute(
        "SELECT user_id, task_id, version, type, data::text, schema_version, occurred_at"
        " FROM events WHERE %(user)s::text IS NULL OR user_id = %(user)s"
        " ORDER BY user_id, task_id, version",
        {"user": user_id},
    )
    streams: dict[Key, list[Recorded]] = {}
    for user, task_id, version, type_name, data, schema_version, occurred_at in cur:
        event = decode_event(type_name, data, schema_version)
        streams.setdefault((user, task_id), []).append(
            Recorded(task_id, version, occurred_at, event)
        )
    return streams


def fold_streams(streams: Mapping[Key, list[Recorded]]) -> dict[Key, Task | None]:
    return {key: fold(events) for key, events in streams.items()}


def projection_rows(
    conn: psycopg.Connection[Any], user_id: str | None = None, *, check_bodies: bool = True
) -> dict[Key, Task]:
    """The `tasks` table (of one user, or all of it) as tasks, keyed like the streams; each
    row's `body` (what queries send) is checked to be its columns' task, as the API's JSON,
    and its `title_casefolded` (what `q` searches) the title case-folded, unless a test
    damaged the rows on purpose."""
    cur = conn.execute(
        f"SELECT user_id, {TASK_COLUMNS}, body, title_casefolded FROM tasks"
        " WHERE %(user)s::text IS NULL OR user_id = %(user)s",
        {"user": user_id},
    )
    rows = {}
    for row in cur:
        task, body, title_casefolded = task_from_row(row[1:-2]), row[-2], row[-1]
        rows[(row[0], row[1])] = task
        if not check_bodies:
            continue
        in_body = msgspec.json.decode(body, type=Task)
        assert in_body == task, f"body {body} != columns {task}"
        assert msgspec.json.encode(in_body).decode() == body, f"body {body} not the API's JSON"
        assert title_casefolded == task.title.casefold(), f"{title_casefolded!r} for {task}"
    return rows


def version_gaps(streams: Mapping[Key, list[Recorded]]) -> dict[Key, list[int]]:
    """The streams whose versions are not exactly 1..N, with the versions they hold."""
    return {
        key: [r.version for r in events]
        for key, events in streams.items()
        if [r.version for r in events] != list(range(1, len(events) + 1))
    }


def assert_projection_is_the_fold(database_url: str, user: str) -> dict[Key, list[Recorded]]:
    """The user's streams hold versions 1..N and their rows equal the fold; the streams."""
    with psycopg.connect(database_url) as conn:
        streams = event_streams(conn, user)
        rows = projection_rows(conn, user)
    assert streams, "no events at all"
    assert version_gaps(streams) == {}
    assert differences(rows, fold_streams(streams)) == {}
    return streams


def differences(rows: Mapping[Key, Task], folds: Mapping[Key, Task | None]) -> dict[Key, str]:
    """Each task whose row is not the fold of its events (a row missing, a row without
    events, or different fields), with what differs."""
    found: dict[Key, str] = {}
    for key in rows.keys() | folds.keys():
        row, folded = rows.get(key), folds.get(key)
        if row == folded:
            continue
        if row is None or folded is None:
            found[key] = f"row {row!r} vs fold {folded!r}"
            continue
        fields = [
            f"{name}: row {getattr(row, name)!r} != fold {getattr(folded, name)!r}"
            for name in row.__struct_fields__
            if getattr(row, name) != getattr(folded, name)
        ]
        found[key] = "; ".join(fields)
    return found


# --- the embedded PostgreSQL of a data folder ------------------------------------------------


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid in pgdata/postmaster.pid, if the file is there."""
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def postgres_alive(pgdata: Path) -> bool:
    """Whether the postmaster named by pgdata/postmaster.pid runs (a zombie does not)."""
    pid = postmaster_pid(pgdata)
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and str(pgdata) in process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def wait_postgres_stopped(pgdata: Path, timeout: float) -> bool:
    """Wait until the data folder's PostgreSQL is gone; whether it went in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not postgres_alive(pgdata) and not (pgdata / "postmaster.pid").exists():
            return True
        time.sleep(0.1)
    return False


def stop_postgres(pgdata: Path, timeout: float = 15.0) -> None:
    """Stop the data folder's PostgreSQL: a fast shutdown (SIGINT), then SIGKILL."""
    pid = postmaster_pid(pgdata)
    if pid is None or not postgres_alive(pgdata):
        return
    process = psutil.Process(pid)
    process.send_signal(signal.SIGINT)
    if wait_postgres_stopped(pgdata, timeout):
        return
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
