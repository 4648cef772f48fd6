"""The `todo-cqrs` command: serve, migrate, token, rebuild."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import psycopg

from todo_cqrs import db, projection
from todo_cqrs.config import Settings


def database_url(settings: Settings) -> str:
    """DATABASE_URL, else the embedded PostgreSQL in the data folder (started if needed)."""
    if settings.database_url:
        return settings.database_url
    print(
        f"todo-cqrs: no DATABASE_URL; using the embedded PostgreSQL in {settings.data_dir}",
        file=sys.stderr,
    )
    return db.start_embedded(settings.data_dir)


def serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from todo_cqrs.http import configure_logging

    configure_logging(settings.log_level)
    url = database_url(settings)
    db.migrate(url)  # once, here, before any worker starts
    os.environ["DATABASE_URL"] = url  # the workers read it (embedded case included)
    settings.resolved_jwt_secret()  # create the development secret before workers race for it
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="todo-cqrs-metrics-")
    uvicorn.run(
        "todo_cqrs.http:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,  # the app logs each request as JSON, with its request id
        log_config=None,
        server_header=False,
    )
    return 0


def migrate(args: argparse.Namespace, settings: Settings) -> int:
    applied = db.migrate(database_url(settings))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def token(args: argparse.Namespace, settings: Settings) -> int:
    from todo_cqrs.http import mint_token

    if not 1 <= len(args.user) <= 255:
        print("USER must be 1 to 255 characters", file=sys.stderr)
        return 2
    print(mint_token(settings.resolved_jwt_secret(), args.user, args.ttl))
    return 0


def rebuild(args: argparse.Namespace, settings: Settings) -> int:
    url = database_url(settings)

    async def run() -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            return await projection.rebuild(conn)

    started = time.monotonic()
    events, tasks = asyncio.run(run())
    seconds = time.monotonic() - started
    rate = events / seconds if seconds > 0 else 0.0
    print(f"rebuilt {tasks} tasks from {events} events in {seconds:.1f} s ({rate:,.0f} events/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="todo-cqrs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(run=serve)

    p = commands.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(run=migrate)

    p = commands.add_parser("token", help="print an HS256 JWT for USER")
    p.add_argument("user")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    p.set_defaults(run=token)

    p = commands.add_parser("rebuild", help="rebuild the read projection from the events")
    p.set_defaults(run=rebuild)

    args = parser.parse_args(argv)
    result: int = args.run(args, Settings.from_env())
    return result


if __name__ == "__main__":
    sys.exit(main())
