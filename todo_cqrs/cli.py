"""The `todo-cqrs` command: serve, migrate, token, rebuild, generate."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time

import psycopg

from todo_cqrs import auth, db, projection
from todo_cqrs.config import Settings
from todo_cqrs.domain import BrokenStream, text_problem


def database_url(settings: Settings, quiet: bool = False) -> str:
    """DATABASE_URL, else the embedded PostgreSQL in the data folder (started if needed),
    which it says on stderr unless `quiet` (cron mails whatever a job prints)."""
    if settings.database_url:
        return settings.database_url
    if not quiet:
        print(
            f"todo-cqrs: no DATABASE_URL; using the embedded PostgreSQL in {settings.data_dir}",
            file=sys.stderr,
        )
    return db.start_embedded(settings.data_dir)


def serve(args: argparse.Namespace, settings: Settings) -> int:
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given is not None and not os.path.isdir(given):  # http's metrics would fail on import
        expected = "PROMETHEUS_MULTIPROC_DIR: expected an existing folder"
        print(f"todo-cqrs: bad configuration: {expected}; got {given!r}", file=sys.stderr)
        return 2
    import uvicorn

    from todo_cqrs.http import BoundedHeadProtocol, configure_logging

    configure_logging(settings.log_level)
    try:
        auth.Verifier.from_settings(settings)  # as each worker will: a bad key stops us here
    except (OSError, ValueError) as error:
        print(f"todo-cqrs: bad configuration: {error}", file=sys.stderr)
        return 2
    url = database_url(settings)
    db.migrate(url)  # once, here, before any worker starts
    os.environ["DATABASE_URL"] = url  # the workers read it (embedded case included)
    settings.hs256_secret()  # create the development secret (if used) before workers race for it
    metrics_dir = None
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="todo-cqrs-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # uvicorn re-raises SIGTERM after its graceful shutdown; exiting normally instead lets
    # the exit hooks run, which stop the embedded PostgreSQL that this process started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(
            "todo_cqrs.http:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            access_log=False,  # the app logs each request as JSON, with its request id
            log_config=None,
            server_header=False,
            http=BoundedHeadProtocol,  # httptools, with a size and a time limit on each head
            timeout_graceful_shutdown=settings.shutdown_timeout,
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def migrate(args: argparse.Namespace, settings: Settings) -> int:
    applied = db.migrate(database_url(settings))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def token(args: argparse.Namespace, settings: Settings) -> int:
    if not 1 <= len(args.user) <= 255:
        print("USER must be 1 to 255 characters", file=sys.stderr)
        return 2
    if problem := text_problem(args.user):  # the service would refuse the token's sub
        print(f"USER {problem}", file=sys.stderr)
        return 2
    if args.ttl < 1:
        print("--ttl must be 1 second or more (the token would be born expired)", file=sys.stderr)
        return 2
    try:
        secret = settings.hs256_secret()
    except ValueError as error:  # the data folder cannot hold the development secret
        print(f"todo-cqrs: bad configuration: {error}", file=sys.stderr)
        return 2
    if secret is None:
        print(
            "HS256 tokens are not accepted: public keys are configured and TODO_JWT_SECRET is"
            " not set; get tokens from your identity provider",
            file=sys.stderr,
        )
        return 2
    print(auth.mint_token(secret, args.user, args.ttl))
    return 0


class Progress:
    """Events folded so far: a bar with rate and time left on a terminal, a line every few
    seconds otherwise, nothing with --quiet."""

    def __init__(self, label: str, total: int | None, quiet: bool) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = self.last_line = time.monotonic()
        self.lines = not quiet and not sys.stderr.isatty()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=" events", unit_scale=True)

    def __call__(self, events: int) -> None:
        self.done += events
        if self.bar is not None:
            self.bar.update(events)
        elif self.lines and time.monotonic() - self.last_line >= 5:
            self.last_line = time.monotonic()
            rate = self.done / (self.last_line - self.started)
            left = ""
            if self.total and rate > 0:
                left = f", about {max(self.total - self.done, 0) / rate:.0f} s left"
            of = f" of ~{self.total:,}" if self.total else ""
            print(
                f"{self.label}: {self.done:,}{of} events, {rate:,.0f} events/s{left}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.monotonic() - self.started


def _unmigrated(url: str, command: str) -> bool:
    """Whether the database lacks migrations, which rebuild and generate would meet as a
    missing table or column; if so, says what to do instead, in one line."""

    async def pending() -> list[str]:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            return await db.pending_migrations(conn)

    if missing := asyncio.run(pending()):
        lacks = f"the database lacks migrations {', '.join(missing)}"
        print(f"todo-cqrs {command}: {lacks}; run `todo-cqrs migrate`", file=sys.stderr)
        return True
    return False


async def _event_count(url: str, user: str | None) -> int | None:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        if user is not None:
            cur = await conn.execute("SELECT count(*) FROM events WHERE user_id = %s", (user,))
        else:  # the planner's estimate, if it has one: counting millions of rows costs
            cur = await conn.execute(
                "SELECT CASE WHEN reltuples > 0 THEN reltuples::bigint"
                " ELSE (SELECT count(*) FROM events) END"
                " FROM pg_class WHERE oid = 'events'::regclass"
            )
        row = await cur.fetchone()
    return int(row[0]) if row and row[0] > 0 else None


def rebuild(args: argparse.Namespace, settings: Settings) -> int:
    label = "check" if args.check else "rebuild"
    if args.check and args.user is not None:
        print(f"todo-cqrs {label}: --check compares every user; drop --user", file=sys.stderr)
        return 2
    if args.user is not None and (problem := text_problem(args.user)):
        print(f"todo-cqrs {label}: --user {problem}", file=sys.stderr)  # no such user id
        return 2
    url = database_url(settings, args.quiet)
    if _unmigrated(url, label):
        return 2
    progress = Progress(label, asyncio.run(_event_count(url, args.user)), args.quiet)
    try:
        if args.check:
            drifts = asyncio.run(projection.check(url, progress))
        elif args.user is not None:
            summary = asyncio.run(projection.rebuild_user(url, args.user, progress))
        else:
            summary = asyncio.run(projection.rebuild_all(url, progress))
    except projection.RebuildBusy as busy:
        progress.close()
        print(f"todo-cqrs {label}: {busy}", file=sys.stderr)
        return 3
    except BrokenStream as broken:  # the events need repair by hand; a traceback would not help
        progress.close()
        left = "nothing was written" if args.check else "the projection is as it was"
        print(
            f"todo-cqrs {label}: cannot fold the stored events: {broken}; {left}", file=sys.stderr
        )
        return 4
    seconds = progress.close()
    rate = progress.done / seconds if seconds > 0 else 0.0
    if args.check:
        for drift in drifts:
            print(
                f"drift: user {drift.user_id!r} task {drift.task_id}: "
                + "; ".join(drift.differences)
            )
        verdict = f"{len(drifts)} drifted task(s)" if drifts else "no drift"
        print(
            f"checked {progress.done:,} events in {seconds:.1f} s ({rate:,.0f} events/s): {verdict}"
        )
        return 1 if drifts else 0
    # A user's rebuild holds the user's lock throughout: nothing to catch up afterwards.
    caught_up = "" if args.user else f"; {summary.caught_up:,} caught up while it ran"
    print(
        f"rebuilt {summary.tasks:,} tasks from {summary.events:,} events in {seconds:.1f} s"
        f" ({rate:,.0f} events/s{caught_up})"
    )
    return 0


def generate(args: argparse.Namespace, settings: Settings) -> int:
    from todo_cqrs import dataset

    if args.events < args.tasks:
        message = "--events must be at least --tasks (each task starts with TaskCreated)"
        print(f"todo-cqrs generate: {message}", file=sys.stderr)
        return 2
    url = database_url(settings, args.quiet)
    if _unmigrated(url, "generate"):
        return 2
    progress = Progress("generate", args.events, args.quiet)
    last = 0

    def report(done: int, total: int) -> None:
        nonlocal last
        progress(done - last)
        last = done

    dataset.generate(url, users=args.users, tasks=args.tasks, events=args.events, progress=report)
    seconds = progress.close()
    print(
        f"generated {last:,} events of {args.tasks:,} tasks of {args.users:,} users"
        f" in {seconds:.1f} s; run `todo-cqrs rebuild` to project them"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="todo-cqrs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--workers", type=_positive, default=1, help="processes (default 1)")
    p.set_defaults(run=serve)

    p = commands.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(run=migrate)

    p = commands.add_parser("token", help="print an HS256 JWT for USER")
    p.add_argument("user")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    p.set_defaults(run=token)

    p = commands.add_parser(
        "rebuild",
        help="rebuild the read projection from the events (online; safe while serve runs)",
    )
    p.add_argument("--user", help="rebuild only this user's tasks, in one transaction")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare the projection with a replay; write nothing; exit 1 on drift",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=rebuild)

    p = commands.add_parser(
        "generate", help="append a synthetic benchmark data set (events only) to the database"
    )
    p.add_argument("--users", type=_positive, default=10_000, help="(default 10,000)")
    p.add_argument("--tasks", type=_positive, default=1_000_000, help="(default 1,000,000)")
    p.add_argument("--events", type=_positive, default=5_000_000, help="(default 5,000,000)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=generate)

    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as error:  # a setting that does not parse: say which, no traceback
        print(f"todo-cqrs: bad configuration: {error}", file=sys.stderr)
        return 2
    try:
        result: int = args.run(args, settings)
    except psycopg.OperationalError as error:  # the reason in one line, for the supervisor
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        what = "is not reachable" if db.connection_lost(error) else "failed"
        print(f"todo-cqrs {args.command}: the database {what}: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not asyncio's traceback
        left = _INTERRUPTED.get(args.command, "")
        print(f"todo-cqrs {args.command}: interrupted{left}", file=sys.stderr)
        return 130
    return result


# What an interrupted command leaves behind.
_INTERRUPTED = {
    # Its new table is swapped in whole or not at all (--user: one transaction).
    "rebuild": "; the projection is as it was",
    # Each batch of tasks is one statement, committed as it goes.
    "generate": "; the tasks appended so far stay, each with all its events",
}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more; got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 1 to 65535; got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
