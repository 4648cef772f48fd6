"""Benchmarks that write their figures into BENCHMARKS.md (run through `nox -s bench_rebuild`).

    python -m todo_cqrs.bench rebuild [--users N] [--tasks N] [--events N]

Uses BENCH_DATABASE_URL (a server where it may create and drop a database), else an embedded
PostgreSQL in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from todo_cqrs import __version__, db

REPORT = Path("BENCHMARKS.md")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {system}"


def write_section(name: str, body: str) -> None:
    """Replace (or add) the section `## name` of BENCHMARKS.md."""
    text = (
        REPORT.read_text() if REPORT.exists() else "# Benchmarks\n\nWritten by `nox -s bench*`.\n"
    )
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    REPORT.write_text(text)


def fresh_database(server_url: str) -> str:
    name = f"todo_cqrs_bench_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_url, dbname=name)


def drop_database(server_url: str, url: str) -> None:
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_cli(url: str, *args: str) -> tuple[float, str]:
    """Run `todo-cqrs ARGS` against url; return (seconds, its last output line)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "todo_cqrs.cli", *args],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=True,
    )
    return time.monotonic() - started, done.stdout.strip().splitlines()[-1]


def bench_rebuild(server_url: str, users: int, tasks: int, events: int) -> None:
    url = fresh_database(server_url)
    try:
        db.migrate(url)
        print(f"generating {events:,} events of {tasks:,} tasks of {users:,} users ...", flush=True)
        generate_s, _ = run_cli(
            url, "generate", "--users", str(users), "--tasks", str(tasks),
            "--events", str(events), "--quiet",
        )  # fmt: skip
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
            server_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        runs = []
        for _ in range(2):
            print("rebuilding ...", flush=True)
            seconds, line = run_cli(url, "rebuild", "--quiet")
            runs.append((seconds, line))
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        check_s, check_line = run_cli(url, "rebuild", "--check", "--quiet")
    finally:
        drop_database(server_url, url)
    best = min(seconds for seconds, _ in runs)
    rows = "\n".join(
        f"| {i} | {s:.1f} s | {events / s:,.0f} | `{line}` |" for i, (s, line) in enumerate(runs, 1)
    )
    write_section(
        "Projection rebuild",
        f"""
Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; Python {platform.python_version()},
PostgreSQL {server_version}, todo-cqrs {__version__}. Database and benchmark share the machine.

Data set: {users:,} users, {tasks:,} tasks, {events:,} events, made by `todo-cqrs generate`
in {generate_s:.0f} s. Each run is a whole `todo-cqrs rebuild` process (start-up, snapshot,
fold, COPY, index build, catch-up, swap), timed from outside.

| run | wall time | events/s (whole process) | its summary line |
| --- | --- | --- | --- |
{rows}

- Best: **{events / best:,.0f} events/s** (target: 150,000).
- Peak resident memory of the largest `todo-cqrs` process: **{rss_mb:.0f} MB**
  (target: under 200 MB).
- `todo-cqrs rebuild --check` over the same data: {check_s:.1f} s (`{check_line}`).
""",
    )
    print(REPORT.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m todo_cqrs.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("rebuild")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=5_000_000)
    args = parser.parse_args()
    server_url = os.environ.get("BENCH_DATABASE_URL")
    if server_url:
        bench_rebuild(server_url, args.users, args.tasks, args.events)
        return
    with tempfile.TemporaryDirectory(prefix="todo-cqrs-bench-") as folder:
        try:
            bench_rebuild(db.start_embedded(Path(folder)), args.users, args.tasks, args.events)
        finally:
            db.stop_embedded(Path(folder))


if __name__ == "__main__":
    main()
