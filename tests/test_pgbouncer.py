"""The service behind PgBouncer in transaction pooling mode: the core suite, run again with
the app's every query and command going through a bouncer on loopback.

The bouncer is Debian's `pgbouncer` (1.18: no prepared statements across transactions), so
the app runs with TODO_PREPARED_STATEMENTS=off; LISTEN needs a session of its own and goes
straight to the database (LISTEN_DATABASE_URL), as the README tells operators to do.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from todo_cqrs import db

CORE_SUITE = [
    "test_commands.py",
    "test_queries.py",
    "test_log_features.py",
    "test_auth_and_errors.py",
    "test_concurrency.py",
]


def _bouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )


class Bouncer(NamedTuple):
    address: str  # host:port
    log: Path


def _bouncer_user(host: str) -> str | None:
    """As root, the user pgbouncer switches to (it refuses to run as root): the owner of
    the server's socket folder (the embedded server's is private to it), else postgres."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        return pwd.getpwuid(Path(host).stat().st_uid).pw_name
    return db._server_user()


@pytest.fixture(scope="module")
def bouncer(server_url: str) -> Iterator[Bouncer]:
    """A PgBouncer in transaction mode in front of the test server."""
    binary = _bouncer_binary()
    if binary is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    target = conninfo_to_dict(server_url)
    user = str(target.get("user") or "postgres")
    folder = Path(tempfile.mkdtemp(prefix="todo-pgbouncer-"))
    port = db.free_port()
    # Every database of the server, by name (the suite makes a fresh one).
    host = str(target.get("host") or "127.0.0.1")
    server = f"host={host} port={target.get('port') or 5432}"
    run_as = _bouncer_user(host)
    (folder / "userlist.txt").write_text(f'"{user}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"""[databases]
* = {server}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/userlist.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""
        + (f"user = {run_as}\n" if run_as else "")
    )
    if run_as:
        for path in (folder, *folder.iterdir()):
            shutil.chown(path, run_as, run_as)
    process = subprocess.Popen(
        [binary, str(folder / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = make_conninfo(server_url, host="127.0.0.1", port=str(port))
        deadline = time.monotonic() + 15
        while True:
            try:
                psycopg.connect(url, connect_timeout=2, prepare_threshold=None).close()
                break
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (folder / "pgbouncer.log").read_text(errors="replace")
                    raise RuntimeError(f"pgbouncer did not start:\n{log[-2000:]}") from None
                time.sleep(0.1)
        yield Bouncer(f"127.0.0.1:{port}", folder / "pgbouncer.log")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_core_suite_passes_through_pgbouncer_in_transaction_mode(
    bouncer: Bouncer, server_url: str
) -> None:
    tests = Path(__file__).parent
    env = {**os.environ, "TEST_DATABASE_URL": server_url, "TEST_VIA_PGBOUNCER": bouncer.address}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         *(str(tests / name) for name in CORE_SUITE)],
        env=env,
        cwd=tests.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary[0] and "failed" not in summary[0], summary
    # The app's connections went through the bouncer, to the run's fresh database.
    assert "login attempt: db=todo_cqrs_test_" in bouncer.log.read_text()


def test_connections_through_the_bouncer_speak_utc(
    bouncer: Bouncer, server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's way to ask for UTC (PGTZ, sent in the startup packet) passes the bouncer;
    the usual `options=-c TimeZone=UTC` is refused by it."""
    host, port = bouncer.address.rsplit(":", 1)
    url = make_conninfo(server_url, host=host, port=port)
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    with pytest.raises(psycopg.OperationalError, match="options"):
        psycopg.connect(url, options="-c TimeZone=UTC").close()
    db.use_utc()
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
